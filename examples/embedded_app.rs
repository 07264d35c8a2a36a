//! An edge application embedding securerun as a library: it streams a chat answer token by token
//! and embeds a few sentences to find the closest one.
//!
//!     cargo run --release --example embedded_app -- LLM_DIR EMBEDDING_DIR [TRUSTED_KEY.pub]
//!
//! With a trusted key, both models must carry a valid signature from it (`securerun sign`);
//! without one the example runs them unverified and says so.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use securerun::{
    open_embedder, open_text_model, ChatMessage, GenerationParams, OpenOptions, Prompt,
    SamplingParams,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(llm), Some(encoder)) = (args.next(), args.next()) else {
        return Err("usage: embedded_app LLM_MODEL EMBEDDING_MODEL [TRUSTED_KEY.pub]".into());
    };
    let opts = match args.next() {
        Some(key) => OpenOptions {
            trust: securerun::signing::TrustPolicy::keys(vec![securerun::trust::read_key(&key)?]),
            ..Default::default()
        },
        None => {
            eprintln!("warning: no trusted key given: running unverified models");
            OpenOptions {
                allow_unsigned: true,
                ..Default::default()
            }
        }
    };

    // 1. Generation with a token stream.
    let mut model = open_text_model(&llm, &opts)?;
    let prompt = Prompt::Chat(vec![ChatMessage::new(
        "user",
        "Give me one tip for staying focused.",
    )]);
    let params = GenerationParams {
        max_tokens: 48,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    let answer = model.generate(&prompt, &params, &mut |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
        ControlFlow::Continue(())
    })?;
    println!(
        "\n[{} prompt + {} generated tokens, finish: {}]",
        answer.prompt_tokens,
        answer.completion_tokens(),
        answer.finish_reason.as_str()
    );

    // 2. Embeddings: which note is closest to the query?
    let embedder = open_embedder(&encoder, &opts)?;
    let notes = [
        "Patient reports mild headache after exercise.",
        "Quarterly revenue grew by four percent.",
        "The turbine was serviced on Tuesday.",
    ];
    let mut texts = vec!["Which maintenance happened this week?".to_string()];
    texts.extend(notes.iter().map(|s| s.to_string()));
    let vectors = embedder.embed(&texts)?;
    let (query, rest) = vectors.split_first().ok_or("no vectors")?;
    for (note, v) in notes.iter().zip(rest) {
        let score: f32 = query.iter().zip(v).map(|(a, b)| a * b).sum();
        println!("{score:.3}  {note}");
    }
    Ok(())
}
