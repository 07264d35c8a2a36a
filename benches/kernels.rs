//! Matrix–vector throughput of every weight type (GB/s of weights read and µs per product) on
//! decode shapes of SmolLM2-135M and a 1.1B llama, and prompt throughput (GFLOP/s with
//! `--tokens N` input rows at once), for docs/benchmarks.md:
//!
//!     RAYON_NUM_THREADS=2 cargo bench --bench kernels [-- --tokens 128]
//!
//! Under `cargo test --all-targets` (no `--bench`) one short pass proves it still runs.

use std::time::Instant;

use securerun::models::kernels::{Elems, Input, Matrix, QKind, QMatrix};

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20000) as f32 / 10000.0 - 1.0
        })
        .collect()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let shapes: &[(usize, usize)] = if bench {
        &[
            (1536, 576),
            (576, 1536),
            (49152, 576),
            (5632, 2048),
            (2048, 5632),
        ]
    } else {
        &[(64, 64)]
    };
    let tokens: usize = std::env::args()
        .skip_while(|a| a != "--tokens")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let reps = if !bench {
        2
    } else if tokens > 1 {
        (400 / tokens).max(3)
    } else {
        200
    };
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>10}",
        "type", "shape", "us", "GB/s", "GFLOP/s"
    );
    for &(rows, cols) in shapes {
        let w = values(rows * cols, 1);
        let x = values(tokens * cols, 2);
        let bf: Vec<u16> = w
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let mats = [
            ("f32", Matrix::f32(rows, cols, Elems::owned(w.clone()))),
            ("bf16", Matrix::bf16(rows, cols, Elems::owned(bf))),
            (
                "q8_0",
                Matrix::quantized(QMatrix::quantize(QKind::Q8_0, &w, rows, cols)),
            ),
            (
                "q4_0",
                Matrix::quantized(QMatrix::quantize(QKind::Q4_0, &w, rows, cols)),
            ),
        ];
        for (name, m) in mats {
            let mut y = vec![0f32; rows * tokens];
            m.apply(&mut Input::new(&x, cols), &mut y);
            let started = Instant::now();
            for _ in 0..reps {
                m.apply(&mut Input::new(&x, cols), &mut y);
            }
            let us = started.elapsed().as_secs_f64() * 1e6 / reps as f64;
            let gbs = m.bytes() as f64 / (us * 1e-6) / 1e9;
            let gflops = 2.0 * (rows * cols * tokens) as f64 / (us * 1e-6) / 1e9;
            println!(
                "{name:<12} {:>12} {us:>10.1} {gbs:>10.2} {gflops:>10.1}",
                format!("{rows}x{cols}")
            );
        }
    }
}
