//! `rrt bench prefix`: what KV reuse buys, measured as a client of `rrt serve` sees it (the
//! OpenAI API of an in-process cluster: coordinator, one worker, router), each workload on a
//! fresh cluster (a cold cache), side by side in one run:
//!
//! 1. **Shared system prompt**: chat requests sharing a ~500-token system prompt with their own
//!    user messages, `--concurrency` in flight, `--max-tokens` new tokens each (`ignore_eos`),
//!    four ways: without the system prompt, with it (the server has seen it: one earlier request
//!    of the workload's shape), with it on a cold cache (the timed run computes it), and with
//!    it under `--prefix-cache off`. Tokens/s and mean time to first token, and their ratios.
//! 2. **Multi-turn**: conversations whose every turn resends the history: prompt tokens the
//!    worker computed (usage: prompt minus cached) with the cache on and off.
//! 3. **Capacity**: requests asking `max_tokens` 2,048 that stop by themselves after ~100
//!    tokens, on the engine at a fixed KV budget: how many run at once, against what the old
//!    worst-case reservation (prompt + max tokens, every layer, f32) admitted, for each KV
//!    precision (f32, bf16, int8) on the same budget.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use rrt_engine::{Engine, EngineConfig, GenParams, Request, Scheduler};
use rrt_model::{KvDtype, WeightDtype};

use super::local_cluster::LocalCluster;
use super::openai_client::{chat_body, http_client, run_all, stream, HttpClient, Streamed};

#[derive(Args, Debug)]
pub struct PrefixBenchArgs {
    /// Model (default: the bundled GGUF, as `rrt serve` serves it).
    #[arg(long, default_value = crate::model_args::DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long, default_value_t = WeightDtype::Q8)]
    dtype: WeightDtype,
    /// Chat requests of the shared-system-prompt workload.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Requests in flight at once (also the worker's --max-sequences).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// New tokens per chat request.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Conversations and turns of the multi-turn workload.
    #[arg(long, default_value_t = 8)]
    conversations: usize,
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Each worker's KV pool, MiB.
    #[arg(long, default_value_t = 2048)]
    kv_budget_mib: usize,
    #[arg(long, default_value_t = KvDtype::F32)]
    kv_dtype: KvDtype,
    /// Positions per KV block.
    #[arg(long, default_value_t = rrt_model::kv::DEFAULT_BLOCK_TOKENS)]
    kv_block_tokens: usize,
    /// KV budget of the capacity workload, MiB.
    #[arg(long, default_value_t = 512)]
    capacity_budget_mib: usize,
    /// Requests of the capacity workload.
    #[arg(long, default_value_t = 128)]
    capacity_requests: usize,
    /// KV precisions the capacity workload runs at, each on the same budget.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,int8")]
    capacity_kv_dtypes: Vec<KvDtype>,
    /// Workloads to run (chat, turns, capacity).
    #[arg(long, value_delimiter = ',', default_value = "chat,turns,capacity")]
    only: Vec<String>,
}

/// The shared system prompt: an assistant's guidelines, ~500 tokens.
const SYSTEM: &[&str] = &[
    "You are a careful, friendly assistant that helps people understand the world around them.",
    "Answer the question that was asked, in plain language, and keep your answers short unless the user asks for detail.",
    "When a question is ambiguous, say which reading you chose and answer that one; do not ask for clarification unless you cannot answer at all.",
    "Prefer concrete examples to abstract definitions, and everyday comparisons to jargon; when you must use a technical term, explain it in the same sentence.",
    "If you are not sure of a fact, say so plainly instead of guessing, and suggest where the user could check it.",
    "Never invent quotations, statistics, dates or sources; if the user asks for a source, describe the kind of source that would have the answer.",
    "Keep a calm and respectful tone even when the user is upset, rude or mistaken; correct mistakes gently and explain why.",
    "Do not give medical, legal or financial advice beyond general information, and remind the user to consult a qualified professional for their own situation.",
    "For questions about history, give the time and place first, then the people involved, then why it mattered.",
    "For questions about science, start from what can be observed, then give the explanation, then one example the user can try or picture.",
    "For questions about cooking, list the ingredients before the steps, give quantities in both metric and imperial units, and mention common substitutions.",
    "For questions about travel, mention the season, the budget and the pace the user seems to want, and suggest one thing that most visitors miss.",
    "For questions about language and writing, show a short example of the correct form next to the incorrect one.",
    "For questions about mathematics, show each step of the calculation on its own line and check the result at the end.",
    "For questions about computers and programming, name the tool or language you assume, give the smallest example that works, and point out one common mistake.",
    "When the user asks for a list, give at most seven items, each with one line of explanation.",
    "When the user asks for a summary, keep it under five sentences and keep the original order of the ideas.",
    "When the user asks for your opinion, give a balanced view with the strongest argument on each side before you say which one you find more convincing and why.",
    "When the user writes in another language, answer in that language, using simple words and short sentences.",
    "Use headings or bullet points only when the answer has several distinct parts; otherwise write ordinary paragraphs.",
    "Do not repeat the question back to the user, do not apologise for being an assistant, and do not end with a list of further questions.",
    "If the user shares personal information, use it only to answer the current question and do not bring it up again later.",
    "Treat every user with the same care, whatever their age, background, beliefs or level of knowledge.",
    "Finally, before you answer, think about what the user most likely needs to know, and lead with that.",
];

const TOPICS: &[&str] = &[
    "photosynthesis",
    "the water cycle",
    "compound interest",
    "the French Revolution",
    "black holes",
    "how vaccines work",
    "the printing press",
    "plate tectonics",
    "baking bread",
    "the stock market",
    "the human heart",
    "machine learning",
    "the Roman Empire",
    "climate change",
    "electric cars",
    "the moon landing",
];

const ASKS: &[&str] = &[
    "Explain {} in simple terms.",
    "What are three surprising facts about {}?",
    "Why does {} matter today?",
    "Write a short paragraph about {} for a ten-year-old.",
];

fn user_message(i: usize) -> String {
    ASKS[(i / TOPICS.len()) % ASKS.len()].replace("{}", TOPICS[i % TOPICS.len()])
}

pub fn run(args: PrefixBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.exists(),
        "{}: no model (run `make model`)",
        args.model.display()
    );
    let wants = |w: &str| args.only.iter().any(|o| o == w);
    println!(
        "rrt bench prefix: {} at {}, KV {} in a pool of {} MiB (blocks of {}), one worker; each workload on a fresh cluster",
        args.model.display(),
        args.dtype,
        args.kv_dtype,
        args.kv_budget_mib,
        args.kv_block_tokens
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if wants("chat") {
        rt.block_on(chat(&args))?;
    }
    if wants("turns") {
        rt.block_on(turns(&args))?;
    }
    if wants("capacity") {
        capacity(&args)?;
    }
    Ok(())
}

/// The worker flags of a cluster with the prefix cache `on`.
fn worker_flags(args: &PrefixBenchArgs, prefix_cache: bool) -> Vec<String> {
    vec![
        format!("--model={}", args.model.display()),
        format!("--dtype={}", args.dtype),
        format!("--max-sequences={}", args.concurrency),
        format!("--kv-budget-mib={}", args.kv_budget_mib),
        format!("--kv-dtype={}", args.kv_dtype),
        format!("--kv-block-tokens={}", args.kv_block_tokens),
        format!("--prefix-cache={}", if prefix_cache { "on" } else { "off" }),
        format!("--max-new-tokens={}", args.max_tokens.max(1024)),
    ]
}

/// One chat workload's figures.
struct ChatRun {
    name: &'static str,
    tokens_per_s: f64,
    mean_ttft: Duration,
    prompt_tokens: u64,
    cached_tokens: u64,
    wall: Duration,
}

impl ChatRun {
    fn of(name: &'static str, results: &[Streamed], wall: Duration) -> Self {
        let n = results.len().max(1) as u32;
        let ttft: Duration = results.iter().filter_map(|r| r.first_token).sum();
        Self {
            name,
            tokens_per_s: results.iter().map(|r| r.completion_tokens).sum::<u64>() as f64
                / wall.as_secs_f64(),
            mean_ttft: ttft / n,
            prompt_tokens: results.iter().map(|r| r.prompt_tokens).sum(),
            cached_tokens: results.iter().map(|r| r.cached_tokens).sum(),
            wall,
        }
    }
}

async fn chat(args: &PrefixBenchArgs) -> anyhow::Result<()> {
    let system = SYSTEM.join(" ");
    let conversation = |i: usize, with_system: bool| {
        let mut m = Vec::new();
        if with_system {
            m.push(("system".to_string(), system.clone()));
        }
        m.push(("user".to_string(), user_message(i)));
        chat_body(&m, args.max_tokens, true)
    };
    println!(
        "\n1. shared system prompt: {} chat requests, {} in flight, {} new tokens each",
        args.requests, args.concurrency, args.max_tokens
    );
    let mut runs = Vec::new();
    // (name, the workload's system prompt, prefix cache, a first request of the workload's
    // shape before the timed ones). The warm runs are a server that has seen its system prompt
    // before (the no-system run's warm-up equally warms SmolLM2's default system prompt); the
    // cold one pays for computing it inside the timed run.
    for (name, with_system, prefix_cache, warm) in [
        ("no system prompt", false, true, true),
        ("system prompt, prefix cache on", true, true, true),
        ("system prompt, prefix cache on, cold", true, true, false),
        ("system prompt, --prefix-cache off", true, false, true),
    ] {
        let cluster = LocalCluster::start(&worker_flags(args, prefix_cache), 1).await?;
        let url = format!("{}/chat/completions", cluster.openai_base()?);
        let client = http_client();
        // One short request first (connections, first-touch allocations): a chat of the
        // workload's shape with its own user message, or (cold) one that shares only the chat
        // template's first tokens.
        let mut first = Vec::new();
        if with_system && warm {
            first.push(("system".to_string(), system.clone()));
        }
        first.push(("user".to_string(), "Hello!".to_string()));
        stream(&client, &url, &chat_body(&first, 4, true), true).await?;
        let bodies = (0..args.requests)
            .map(|i| conversation(i, with_system))
            .collect();
        let (results, wall) = run_all(&client, &url, bodies, args.concurrency, false).await?;
        let run = ChatRun::of(name, &results, wall);
        let wave = |r: &[Streamed]| {
            let t: Duration = r.iter().filter_map(|r| r.first_token).sum();
            t.as_secs_f64() * 1e3 / r.len().max(1) as f64
        };
        let first = args.concurrency.min(results.len());
        println!(
            "  {name}: {:.1} tokens/s, mean time to first token {:.0} ms (the first {first} sent: {:.0} ms, the rest: {:.0} ms), prompt tokens {} ({} cached), {:.1} s",
            run.tokens_per_s,
            run.mean_ttft.as_secs_f64() * 1e3,
            wave(&results[..first]),
            wave(&results[first..]),
            run.prompt_tokens,
            run.cached_tokens,
            run.wall.as_secs_f64()
        );
        runs.push(run);
        cluster.stop().await?;
    }
    let base = &runs[0];
    println!("\n| workload | tokens/s | vs no system prompt | mean TTFT ms | vs no system prompt | prompt tokens computed |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.1} | {:.2}x | {:.0} | {:.2}x | {} of {} |",
            r.name,
            r.tokens_per_s,
            r.tokens_per_s / base.tokens_per_s,
            r.mean_ttft.as_secs_f64() * 1e3,
            r.mean_ttft.as_secs_f64() / base.mean_ttft.as_secs_f64().max(1e-9),
            r.prompt_tokens - r.cached_tokens,
            r.prompt_tokens
        );
    }
    let (on, off) = (&runs[1], &runs[3]);
    println!(
        "prefix cache on vs off: tokens/s {:.2}x, mean TTFT {:.2}x lower",
        on.tokens_per_s / off.tokens_per_s,
        off.mean_ttft.as_secs_f64() / on.mean_ttft.as_secs_f64().max(1e-9)
    );
    Ok(())
}

async fn warm_up(client: &HttpClient, url: &str) -> anyhow::Result<()> {
    let body = chat_body(&[("user".into(), "Hello!".into())], 4, true);
    stream(client, url, &body, true).await.map(|_| ())
}

async fn turns(args: &PrefixBenchArgs) -> anyhow::Result<()> {
    println!(
        "\n2. multi-turn: {} conversations x {} turns, each turn resending the history ({} new tokens a reply)",
        args.conversations, args.turns, args.max_tokens
    );
    let mut rows = Vec::new();
    for prefix_cache in [false, true] {
        let cluster = LocalCluster::start(&worker_flags(args, prefix_cache), 1).await?;
        let url = format!("{}/chat/completions", cluster.openai_base()?);
        let client = http_client();
        warm_up(&client, &url).await?;
        let started = Instant::now();
        let tasks: Vec<_> = (0..args.conversations)
            .map(|c| {
                let (client, url, turns, max_tokens) =
                    (client.clone(), url.clone(), args.turns, args.max_tokens);
                tokio::spawn(async move {
                    let mut history: Vec<(String, String)> = Vec::new();
                    let mut sums = (0u64, 0u64, 0u64);
                    for t in 0..turns {
                        history.push(("user".into(), user_message(c * 7 + t * 3)));
                        // Replies end where the model ends them, as a user's would.
                        let body = chat_body(&history, max_tokens, false);
                        let r = stream(&client, &url, &body, false).await?;
                        sums.0 += r.prompt_tokens;
                        sums.1 += r.cached_tokens;
                        sums.2 += r.completion_tokens;
                        history.push(("assistant".into(), r.text));
                    }
                    anyhow::Ok(sums)
                })
            })
            .collect();
        let (mut prompt, mut cached, mut generated) = (0, 0, 0);
        for t in tasks {
            let (p, c, g) = t.await??;
            (prompt, cached, generated) = (prompt + p, cached + c, generated + g);
        }
        let wall = started.elapsed();
        println!(
            "  prefix cache {}: prompt tokens {prompt}, computed {}, {generated} generated, {:.1} s",
            if prefix_cache { "on" } else { "off" },
            prompt - cached,
            wall.as_secs_f64()
        );
        rows.push((prefix_cache, prompt, prompt - cached, wall));
        cluster.stop().await?;
    }
    let (off, on) = (&rows[0], &rows[1]);
    println!("\n| prefix cache | prompt tokens sent | prompt tokens computed | wall s |");
    println!("|---|---|---|---|");
    for (cache, prompt, computed, wall) in &rows {
        println!(
            "| {} | {prompt} | {computed} | {:.1} |",
            if *cache { "on" } else { "off" },
            wall.as_secs_f64()
        );
    }
    println!(
        "prompt tokens computed fall {:.1}x with the prefix cache (wall time {:.2}x)",
        off.2 as f64 / on.2.max(1) as f64,
        off.3.as_secs_f64() / on.3.as_secs_f64()
    );
    Ok(())
}

/// Requests asking 2,048 new tokens that stop by themselves after ~100, on the engine at a
/// fixed KV budget: the most that run at once, against the old worst-case reservation.
fn capacity(args: &PrefixBenchArgs) -> anyhow::Result<()> {
    const ASKED: usize = 2048;
    const STOPS_AFTER: usize = 100;
    const PROMPT: usize = 30;
    let loaded = rrt_model::load(&args.model, args.dtype)?;
    let budget = args.capacity_budget_mib << 20;
    let model = loaded.model;
    let eos = *loaded
        .tokenizer
        .eos
        .first()
        .ok_or_else(|| anyhow::anyhow!("the model names no end-of-sequence token"))?;
    // What admission reserved before paged KV: prompt + max tokens, every layer, f32.
    let old_per_request = (PROMPT + ASKED) * model.cfg.kv_bytes_per_token();
    let old = budget / old_per_request;
    println!(
        "\n3. capacity: {} requests asking {ASKED} new tokens, each stopping after {STOPS_AFTER}, KV budget {} MiB",
        args.capacity_requests, args.capacity_budget_mib
    );
    println!("| admission | KV bytes a token | requests running at once (peak) | mean over the steps | vs worst-case reservation (peak / mean) | tokens/s |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| worst-case reservation (before paged KV: {} MiB a request) | {} | {old} | {old} | 1.00x | |",
        old_per_request >> 20,
        model.cfg.kv_bytes_per_token()
    );
    for &kv_dtype in &args.capacity_kv_dtypes {
        let mut engine = Engine::new(
            model.clone(),
            EngineConfig {
                scheduler: Scheduler::Cdb,
                max_batch_rows: 256,
                max_sequences: args.capacity_requests,
                kv_budget_bytes: budget,
                kv_block_tokens: args.kv_block_tokens,
                kv_dtype,
                prefix_cache: false,
                ..EngineConfig::default()
            },
        )?;
        let vocab = model.cfg.vocab_size as u32;
        let receivers: Vec<_> = (0..args.capacity_requests as u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..PROMPT as u32)
                    .map(|j| (1000 + i * 97 + j * 13) % vocab)
                    .collect();
                // The text it "writes": ~100 tokens, then the end of sequence.
                let mut forced: Vec<u32> = (0..STOPS_AFTER as u32)
                    .map(|j| (2000 + i * 31 + j * 7) % vocab)
                    .collect();
                forced.push(eos);
                let params = GenParams {
                    max_new_tokens: ASKED,
                    forced,
                    stop_tokens: vec![eos],
                    ..GenParams::default()
                };
                let (req, rx) = Request::with_channel(i as u64, prompt, params, None);
                engine.submit(req);
                rx
            })
            .collect();
        let started = Instant::now();
        let (mut peak, mut running_steps, mut steps) = (0, 0, 0);
        while engine.pending() > 0 {
            engine.step();
            peak = peak.max(engine.running_len());
            running_steps += engine.running_len();
            steps += 1;
        }
        let mean = running_steps as f64 / steps.max(1) as f64;
        let secs = started.elapsed().as_secs_f64();
        let failed = receivers
            .iter()
            .filter(|rx| rrt_engine::Received::drain(rx).is_err())
            .count();
        anyhow::ensure!(
            failed == 0,
            "{failed} capacity requests failed ({kv_dtype} KV)"
        );
        println!(
            "| paged KV blocks, {kv_dtype} (measured; {} preemptions) | {} | {peak} | {mean:.1} | {:.1}x / {:.1}x | {:.0} |",
            engine.kv_counters().preemptions,
            model
                .kv_layout(args.kv_block_tokens, kv_dtype)?
                .bytes_per_token(),
            peak as f64 / old.max(1) as f64,
            mean / old.max(1) as f64,
            engine.stats().tokens as f64 / secs
        );
    }
    Ok(())
}
