//! Teacher-written training text (sequence-level distillation): the source model answers
//! seeded prompts of five kinds ([`prompts`]) through the batched engine, and each answer, in the
//! chat form the model is served in, becomes a document. Answers that are too short, that repeat
//! themselves, or that mostly repeat an earlier answer are dropped ([`filter`]).
//!
//! Deterministic for a seed: document `i`'s prompt and sampling seed derive from `(seed, set, i)`
//! alone, the engine's rows do not depend on what else is batched, and documents are kept in
//! index order (the corpus is the shortest prefix of documents reaching the token target), so
//! the same settings write the same bytes whatever the concurrency.

pub mod filter;
pub mod prompts;

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rrt_engine::{
    Engine, EngineConfig, Event, ExitKind, ExitPolicy, FinishReason, GenParams, KvFill, Request,
    Scheduler,
};
use rrt_model::{KvDtype, Llama, SamplingParams, Tokenizer};
use serde::Serialize;

use crate::error::{Result, TrainError};
pub use filter::{distinct_ngram_share, Filter, Verdict};
pub use prompts::{Kind, Prompt, PromptSet};

/// What to write.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub set: PromptSet,
    /// Answer tokens to keep (the corpus stops at the first document that reaches it).
    pub tokens: usize,
    /// The longest answer.
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Requests generating at once.
    pub in_flight: usize,
    /// Rows one engine step runs (decode rows first, prompt chunks fill the rest).
    pub max_batch_rows: usize,
    /// Precision of the KV cache (bf16: half the bytes decode attention reads).
    #[serde(serialize_with = "as_text")]
    pub kv_dtype: KvDtype,
}

fn as_text<S: serde::Serializer>(d: &KvDtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}").to_lowercase())
}

/// One kept document.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    pub index: u64,
    pub kind: Kind,
    pub prompt: String,
    pub answer: String,
    /// The prompt rendered with the chat template, the answer, and the end-of-turn token when
    /// the answer ended by itself: what the training reads.
    #[serde(skip)]
    pub text: String,
    pub answer_tokens: usize,
    /// Whether the answer ended by itself (else at `max_new_tokens`).
    pub ended: bool,
}

/// Where a run stands (for a progress bar).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub kept_tokens: usize,
    pub documents: usize,
    pub dropped: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// What a run wrote, and how fast.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub options: Options,
    pub documents: usize,
    /// Answer tokens kept.
    pub answer_tokens: usize,
    /// Tokens of the documents as the training reads them (prompts, template and answers).
    pub text_tokens: usize,
    /// Every token the engine generated (dropped documents and the ones cut at the end
    /// included).
    pub generated_tokens: usize,
    pub seconds: f64,
    /// Generated tokens per second.
    pub generated_per_s: f64,
    /// Kept answer tokens per second.
    pub kept_per_s: f64,
    pub by_kind: BTreeMap<String, usize>,
    pub dropped: BTreeMap<String, usize>,
    /// Share of answers that ended by themselves.
    pub ended_share: f64,
    /// `(n, distinct n-grams / n-grams)` over the kept answers' tokens.
    pub distinct_ngrams: Vec<(usize, f64)>,
}

/// A request in flight: its prompt and what it has generated so far.
struct Pending {
    prompt: Prompt,
    rendered: String,
    prompt_tokens: usize,
    rx: Receiver<Event>,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
}

/// The prompt and sampling seed of document `i`: a function of `(seed, set, i)` alone.
fn document_seed(seed: u64, set: PromptSet, i: u64) -> u64 {
    let set = match set {
        PromptSet::Train => 0x7261_696e,
        PromptSet::Heldout => 0x6865_6c64,
    };
    // SplitMix64 of the three.
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(set)
        .wrapping_add(i.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The prompt as the model is served it: its chat template around one user turn, or the plain
/// text and a blank line for a model without one.
fn render(tokenizer: &Tokenizer, prompt: &str) -> Result<String> {
    if tokenizer.chat_template.is_some() {
        Ok(tokenizer.chat_prompt(prompt)?)
    } else {
        Ok(format!("{prompt}\n\n"))
    }
}

/// What is wrong with `opts`, if anything (checked again by [`generate`]).
pub fn check(opts: &Options) -> Result<()> {
    let bad = |m: &str| Err(TrainError::Input(m.into()));
    if opts.tokens == 0 {
        return bad("--tokens must be at least 1");
    }
    if opts.max_new_tokens < filter::MIN_ANSWER_TOKENS {
        return bad(&format!(
            "--max-new-tokens must be at least {} (shorter answers are dropped)",
            filter::MIN_ANSWER_TOKENS
        ));
    }
    if opts.in_flight == 0 || opts.max_batch_rows == 0 {
        return bad("--in-flight and --max-batch-rows must be at least 1");
    }
    let sampling = sampling(opts, 0);
    sampling
        .validate()
        .map_err(|e| TrainError::Input(e.to_string()))
}

fn sampling(opts: &Options, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: opts.temperature,
        top_p: opts.top_p,
        seed,
        ..SamplingParams::default()
    }
}

/// Writes a corpus: each kept document goes to `sink` in index order; `progress` is called
/// after every engine step.
pub fn generate(
    model: Llama,
    tokenizer: &Tokenizer,
    opts: &Options,
    sink: &mut dyn FnMut(&Document) -> Result<()>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report> {
    check(opts)?;
    let started = Instant::now();
    let context = model.cfg.max_position_embeddings;
    // Every request's whole context fits at once (the longest prompt is well under 128 tokens
    // with a chat template), so nothing is preempted.
    let per_token = model
        .kv_layout(16, opts.kv_dtype)
        .map_err(|e| TrainError::Input(e.to_string()))?
        .block_bytes()
        / 16;
    let longest = (256 + opts.max_new_tokens).min(context);
    let cfg = EngineConfig {
        scheduler: Scheduler::Cdb,
        max_batch_rows: opts.max_batch_rows,
        max_sequences: opts.in_flight,
        kv_budget_bytes: per_token * (longest + 16) * (opts.in_flight + 1),
        kv_block_tokens: 16,
        kv_dtype: opts.kv_dtype,
        // The chat template's system prompt is the same in every request.
        prefix_cache: true,
        model_id: "rrt corpus".into(),
        default_exit: ExitPolicy {
            kind: ExitKind::None,
            threshold: 1.0,
        },
        kv_fill: KvFill::Propagate,
        fault: None,
    };
    let mut engine = Engine::new(model, cfg).map_err(|e| TrainError::Input(e.to_string()))?;
    let mut filter = Filter::default();
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let (mut next, mut emit) = (0u64, 0u64);
    let mut p = Progress::default();
    let mut report = Report {
        options: opts.clone(),
        documents: 0,
        answer_tokens: 0,
        text_tokens: 0,
        generated_tokens: 0,
        seconds: 0.0,
        generated_per_s: 0.0,
        kept_per_s: 0.0,
        by_kind: BTreeMap::new(),
        dropped: BTreeMap::new(),
        ended_share: 0.0,
        distinct_ngrams: Vec::new(),
    };
    let mut ended = 0usize;
    let mut kept_answers: Vec<Vec<u32>> = Vec::new();
    'run: loop {
        // Keep `in_flight` requests running while the kept text is short of the target.
        while p.kept_tokens < opts.tokens
            && pending.values().filter(|r| r.finish.is_none()).count() < opts.in_flight
        {
            let seed = document_seed(opts.seed, opts.set, next);
            let prompt = prompts::sample(opts.set, &mut StdRng::seed_from_u64(seed));
            let rendered = render(tokenizer, &prompt.text)?;
            let ids = tokenizer.encode(&rendered)?;
            let params = GenParams {
                max_new_tokens: opts.max_new_tokens.min(context.saturating_sub(ids.len())),
                sampling: sampling(opts, seed),
                stop_tokens: tokenizer.eos.clone(),
                ..GenParams::default()
            };
            let prompt_tokens = ids.len();
            let (req, rx) = Request::with_channel(next, ids, params, None);
            engine.submit(req);
            pending.insert(
                next,
                Pending {
                    prompt,
                    rendered,
                    prompt_tokens,
                    rx,
                    tokens: Vec::new(),
                    finish: None,
                },
            );
            next += 1;
        }
        if pending.is_empty() {
            break;
        }
        engine.step();
        for r in pending.values_mut().filter(|r| r.finish.is_none()) {
            for event in r.rx.try_iter() {
                match event {
                    Event::Token { token, .. } => {
                        r.tokens.push(token);
                        p.generated_tokens += 1;
                    }
                    Event::Finished { reason, .. } => r.finish = Some(reason),
                    Event::Failed(e) => {
                        return Err(TrainError::Input(format!("generation failed: {e}")))
                    }
                    Event::Admitted { .. } => {}
                }
            }
        }
        // Documents leave in index order.
        while pending.get(&emit).is_some_and(|r| r.finish.is_some()) {
            let r = pending.remove(&emit).expect("checked above");
            let index = emit;
            emit += 1;
            let ends = r.finish == Some(FinishReason::Stop);
            match filter.judge(&r.tokens) {
                Verdict::Keep => {}
                dropped => {
                    *report.dropped.entry(dropped.name().into()).or_default() += 1;
                    p.dropped += 1;
                    continue;
                }
            }
            let answer = tokenizer.decode(&r.tokens)?;
            let end = if ends {
                r.tokens
                    .last()
                    .and(tokenizer.eos.first())
                    .and_then(|&e| tokenizer.token_to_str(e))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let doc = Document {
                index,
                kind: r.prompt.kind,
                prompt: r.prompt.text,
                text: format!("{}{answer}{end}\n", r.rendered),
                answer,
                answer_tokens: r.tokens.len(),
                ended: ends,
            };
            sink(&doc)?;
            ended += ends as usize;
            report.text_tokens += r.prompt_tokens + r.tokens.len() + ends as usize;
            *report.by_kind.entry(doc.kind.name().into()).or_default() += 1;
            p.kept_tokens += doc.answer_tokens;
            p.documents += 1;
            kept_answers.push(r.tokens);
            if p.kept_tokens >= opts.tokens {
                // The rest are cancelled by dropping their receivers.
                break 'run;
            }
        }
        p.seconds = started.elapsed().as_secs_f64();
        progress(&p);
    }
    drop(pending);
    p.seconds = started.elapsed().as_secs_f64();
    progress(&p);
    report.documents = p.documents;
    report.answer_tokens = p.kept_tokens;
    report.generated_tokens = p.generated_tokens;
    report.seconds = p.seconds;
    report.generated_per_s = p.generated_tokens as f64 / p.seconds.max(1e-9);
    report.kept_per_s = p.kept_tokens as f64 / p.seconds.max(1e-9);
    report.ended_share = ended as f64 / p.documents.max(1) as f64;
    report.distinct_ngrams = [1, 2, 3, 4]
        .iter()
        .map(|&n| (n, distinct_ngram_share(&kept_answers, n)))
        .collect();
    Ok(report)
}

/// Tokens per kind of a report's documents, for printing.
pub fn kinds_line(report: &Report) -> String {
    let counts: HashMap<_, _> = report.by_kind.iter().collect();
    Kind::ALL
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                k.name(),
                counts.get(&k.name().to_string()).map_or(0, |c| **c)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
