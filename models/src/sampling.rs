//! Sampling parameters and their validation; candle-transformers' `LogitsProcessor` does the
//! sampling itself (greedy, temperature, top-k, top-p, seeded).

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables; > 1.0 discourages tokens already in the context (prompt included, as in
    /// Hugging Face transformers).
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`, in [−2, 2]; the prompt does not count).
    #[serde(default)]
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, in [−2, 2]).
    #[serde(default)]
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges, so nonsense values are a clear error rather than NaN probabilities.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || !(0.0..=100.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be in [0, 100], got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".into());
        }
        if !self.repetition_penalty.is_finite()
            || !(0.01..=100.0).contains(&self.repetition_penalty)
        {
            return Err(format!(
                "repetition_penalty must be in [0.01, 100], got {}",
                self.repetition_penalty
            ));
        }
        for (name, p) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !p.is_finite() || !(-2.0..=2.0).contains(&p) {
                return Err(format!("{name} must be in [-2, 2], got {p}"));
            }
        }
        Ok(())
    }

    pub(crate) fn processor(&self) -> LogitsProcessor {
        let sampling = if self.temperature < 1e-7 {
            Sampling::ArgMax
        } else {
            let temperature = self.temperature;
            match (self.top_k, self.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) if p >= 1.0 => Sampling::All { temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }

    pub(crate) fn penalize(&self, logits: Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        if self.repetition_penalty == 1.0 {
            return Ok(logits);
        }
        candle_transformers::utils::apply_repeat_penalty(&logits, self.repetition_penalty, context)
    }
}
