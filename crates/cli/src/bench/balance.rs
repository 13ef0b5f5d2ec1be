//! `rrt bench balance`: routing decisions a second one router core makes, per policy and
//! cluster size, without the network: the router's own `Pool` and `Balancer` on a synthetic
//! cluster view (varied loads, speeds, depths), each decision building the request's prefix key
//! (`Key::of_request`) and choosing, as the router's request path does, on one thread. The
//! prefix index is warmed first with earlier turns of the conversations the timed requests
//! continue (so cache-aware decisions walk real matches and holders). What it leaves out is the
//! request's relay (the gRPC stream: most of a request's router CPU, `rrt bench scale` measures
//! it); so it states the limit of the choice itself.

use std::time::{Duration, Instant};

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rrt_proto::v1 as pb;
use rrt_router::balance::{Ask, Balance, Balancer, Key, Settings};
use rrt_router::pool::Pool;

#[derive(Args, Debug)]
pub struct BalanceBenchArgs {
    /// Cluster sizes (workers in the view).
    #[arg(long, value_delimiter = ',', default_value = "50,200,1000,10000")]
    workers: Vec<usize>,
    /// Policies (`--balance` values).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = super::POLICIES
    )]
    policies: Vec<String>,
    /// Timed decisions per (size, policy).
    #[arg(long, default_value_t = 20_000)]
    decisions: usize,
    /// Distinct system prompts the conversations share.
    #[arg(long, default_value_t = 64)]
    system_prompts: usize,
}

fn view(workers: usize, rng: &mut StdRng) -> pb::ClusterView {
    pb::ClusterView {
        workers: (0..workers)
            .map(|i| pb::WorkerView {
                worker_id: format!("w{i}"),
                address: format!("127.0.0.1:{}", 10_000 + i),
                model: "m".into(),
                score: rng.random_range(0.0..2.0),
                queue_length: rng.random_range(0..4),
                running: rng.random_range(0..16),
                loop_steps_per_second: rng.random_range(400.0..1600.0),
                expected_loops: rng.random_range(1.4..2.0),
                kv_usage: rng.random_range(0.0..0.8),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The `t`-th turn of conversation `c` (its earlier turns and replies, then a new question).
fn request(c: usize, t: usize, systems: usize) -> pb::GenerateRequest {
    let msg = |role: &str, content: String| pb::ChatMessage {
        role: role.into(),
        content,
    };
    let mut messages = vec![msg(
        "system",
        format!(
            "You are assistant {}. {}",
            c % systems,
            "Answer briefly and cite the manual. ".repeat(24)
        ),
    )];
    for k in 0..=t {
        messages.push(msg(
            "user",
            format!("User {c}, question {k}: how do I reset it?"),
        ));
        if k < t {
            messages.push(msg(
                "assistant",
                "Hold the button for ten seconds. ".repeat(6),
            ));
        }
    }
    pb::GenerateRequest {
        chat: true,
        messages,
        max_new_tokens: 64,
        ..Default::default()
    }
}

struct Row {
    workers: usize,
    policy: String,
    per_s: f64,
    key_us: f64,
    choose_us: f64,
}

fn one(args: &BalanceBenchArgs, workers: usize, policy: &str) -> anyhow::Result<Row> {
    let balance = <Balance as clap::ValueEnum>::from_str(policy, true)
        .map_err(|e| anyhow::anyhow!("--policies: {policy:?}: {e}"))?;
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let pool: Pool<()> = Pool::new(Duration::from_secs(3600));
    pool.apply_view(&view(workers, &mut rng), now, |_| Some(()), |_| false);
    let b = Balancer::new(Settings {
        balance,
        share_placements: false,
        ..Settings::default()
    });
    // Conversations: two per worker; the timed requests are their second turns, the first
    // turns were routed before (warming the index and the depth history).
    let conversations = 2 * workers;
    for c in 0..conversations {
        let key = Key::of_request(&request(c, 0, args.system_prompts));
        let ask = Ask {
            model: "m",
            max_new_tokens: Some(64),
            key: &key,
        };
        let (guard, route) = b
            .choose(&pool, &ask, now, &[], &mut rng)
            .ok_or_else(|| anyhow::anyhow!("no worker serves the model"))?;
        b.finished(&route, Some(1.7), 300, 200);
        drop(guard);
    }
    let requests: Vec<pb::GenerateRequest> = (0..args.decisions.min(4096))
        .map(|i| request(i % conversations, 1, args.system_prompts))
        .collect();
    let later = now + Duration::from_secs(1);
    let (mut key_s, mut choose_s) = (0.0, 0.0);
    let started = Instant::now();
    for i in 0..args.decisions {
        let t0 = Instant::now();
        let key = Key::of_request(&requests[i % requests.len()]);
        let t1 = Instant::now();
        let ask = Ask {
            model: "m",
            max_new_tokens: Some(64),
            key: &key,
        };
        let chosen = b.choose(&pool, &ask, later, &[], &mut rng);
        let t2 = Instant::now();
        drop(chosen);
        key_s += (t1 - t0).as_secs_f64();
        choose_s += (t2 - t1).as_secs_f64();
    }
    let wall = started.elapsed().as_secs_f64();
    let n = args.decisions.max(1) as f64;
    Ok(Row {
        workers,
        policy: policy.to_string(),
        per_s: n / wall,
        key_us: 1e6 * key_s / n,
        choose_us: 1e6 * choose_s / n,
    })
}

pub fn run(args: BalanceBenchArgs) -> anyhow::Result<()> {
    println!(
        "rrt bench balance: {} decisions per (size, policy) on one thread, second turns of chats under {} system prompts (prompt ~1.1 KB), index warmed with their first turns",
        args.decisions, args.system_prompts
    );
    let mut rows = Vec::new();
    for &w in &args.workers {
        for p in &args.policies {
            let r = one(&args, w, p)?;
            eprintln!(
                "{w} workers, {p}: {:.0} decisions/s ({:.1} us key + {:.1} us choice)",
                r.per_s, r.key_us, r.choose_us
            );
            rows.push(r);
        }
    }
    println!("| workers | policy | decisions/s (one core) | us per decision: key | choice | vs round-robin at this size |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let rr = rows
            .iter()
            .find(|x| x.workers == r.workers && x.policy == "round-robin")
            .map_or(String::from("-"), |x| format!("{:.2}x", r.per_s / x.per_s));
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {} |",
            r.workers, r.policy, r.per_s, r.key_us, r.choose_us, rr
        );
    }
    Ok(())
}
