pub use securerun_models as models;
