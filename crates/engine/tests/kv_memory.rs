//! KV memory as a server manages it: blocks taken as sequences grow, full blocks reused across
//! requests through the prefix cache, preemption by recompute when the pool runs out. The
//! tests hold each mechanism to the output of the plain path: a prefix-cache hit gives exactly
//! the tokens of a cold cache, a preempted sequence exactly those of an uninterrupted one
//! (greedy and seeded sampling, every scheduler, exits where they apply), and an overloaded
//! tiny pool finishes everything.

#![forbid(unsafe_code)]

mod common;

use std::sync::mpsc::Receiver;

use common::{collect, kv_block_bytes, params, tiny_recursive};
use rrt_engine::{
    Engine, EngineConfig, EngineError, Event, ExitKind, ExitPolicy, ExitTrace, FinishReason,
    GenParams, KvFill, Request, Scheduler,
};
use rrt_model::{KvDtype, Llama, SamplingParams};

/// An engine with a pool of `blocks` blocks of 16 positions.
fn engine(model: &Llama, scheduler: Scheduler, blocks: usize, prefix_cache: bool) -> Engine {
    Engine::new(
        model.clone(),
        EngineConfig {
            scheduler,
            max_batch_rows: 24,
            max_sequences: 8,
            kv_budget_bytes: blocks * kv_block_bytes(model),
            prefix_cache,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn sampled(max_new: usize, seed: u64) -> GenParams {
    GenParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        },
        ..params(max_new)
    }
}

fn submit(
    engine: &mut Engine,
    id: u64,
    prompt: &[u32],
    p: GenParams,
    exit: Option<ExitPolicy>,
) -> Receiver<Event> {
    let (req, rx) = Request::with_channel(id, prompt.to_vec(), p, exit);
    engine.submit(req);
    rx
}

/// Eight chat-like prompts: a shared 40-token "system prompt" (two full blocks and a part)
/// and a tail of their own.
fn shared_prefix_prompts(vocab: u32) -> Vec<Vec<u32>> {
    let system: Vec<u32> = (0..40u32).map(|j| (j * 37 + 11) % vocab).collect();
    (0..8u32)
        .map(|i| {
            let tail = (0..2 + i % 5).map(|j| (i * 13 + j * 7 + 3) % vocab);
            system.iter().copied().chain(tail).collect()
        })
        .collect()
}

/// Exits at depths from a fixed trace (1, 2 or 3 of 3 loops).
fn trace_for(ids: std::ops::Range<u64>, tokens: usize) -> ExitTrace {
    let mut trace = ExitTrace::default();
    for id in ids {
        for t in 0..tokens {
            trace.insert(id, t, 1 + (id as usize * 5 + t * 3 + t * t) % 3);
        }
    }
    trace
}

/// What a workload of shared prefixes and one follow-up turn gives: request 0 alone first (its
/// blocks get cached), then the seven others together, then a second turn of request 0 (its
/// prompt + reply + more). Returns every request's tokens and exit loops, and the engine.
fn chat_workload(
    mut engine: Engine,
    sampling: &dyn Fn(u64) -> GenParams,
    exit: Option<ExitPolicy>,
) -> (Vec<Vec<(u32, usize)>>, Engine) {
    let vocab = engine.model().cfg.vocab_size as u32;
    let prompts = shared_prefix_prompts(vocab);
    let mut out = Vec::new();
    let rx = submit(&mut engine, 0, &prompts[0], sampling(0), exit);
    engine.run_until_idle();
    out.push(collect(&rx).pairs());
    let rxs: Vec<_> = (1..8)
        .map(|i| submit(&mut engine, i, &prompts[i as usize], sampling(i), exit))
        .collect();
    engine.run_until_idle();
    out.extend(rxs.iter().map(|rx| collect(rx).pairs()));
    let mut turn2 = prompts[0].clone();
    turn2.extend(out[0].iter().map(|(t, _)| *t));
    turn2.extend([5, 6, 7, 8, 9]);
    let rx = submit(&mut engine, 8, &turn2, sampling(8), exit);
    engine.run_until_idle();
    out.push(collect(&rx).pairs());
    (out, engine)
}

#[test]
fn a_prefix_cache_hit_gives_exactly_the_tokens_of_a_cold_cache() {
    let model = tiny_recursive();
    let greedy = |_: u64| params(10);
    let seeded = |i: u64| sampled(10, 1000 + i);
    let replay = ExitPolicy {
        kind: ExitKind::Replay,
        threshold: 0.0,
    };
    for scheduler in [Scheduler::Static, Scheduler::Csb, Scheduler::Cdb] {
        let exits: &[(Option<ExitPolicy>, KvFill)] = if scheduler == Scheduler::Cdb {
            &[
                (None, KvFill::Propagate),
                (Some(replay), KvFill::Propagate),
                (Some(replay), KvFill::Copy),
            ]
        } else {
            &[(None, KvFill::Propagate)]
        };
        for &(exit, fill) in exits {
            for (name, sampling) in [
                ("greedy", &greedy as &dyn Fn(u64) -> GenParams),
                ("seeded", &seeded),
            ] {
                let run = |prefix_cache: bool| {
                    let mut e = engine(&model, scheduler, 64, prefix_cache);
                    let mut cfg = e.config().clone();
                    cfg.kv_fill = fill;
                    e = Engine::new(model.clone(), cfg).unwrap();
                    e.set_trace(trace_for(0..9, 10));
                    chat_workload(e, sampling, exit)
                };
                let (cold, cold_engine) = run(false);
                let (warm, warm_engine) = run(true);
                let what = format!("{scheduler:?} {name} exits {exit:?} {fill:?}");
                assert_eq!(warm, cold, "{what}: the prefix cache changed the output");
                let hits = warm_engine.kv_counters();
                // Requests 1-7 find the two full blocks of the shared prefix; the second turn
                // finds at least those.
                assert!(hits.hit_tokens >= 8 * 32, "{what}: {hits:?}");
                assert_eq!(cold_engine.kv_counters().hit_tokens, 0, "{what}");
                assert!(
                    hits.prefill_tokens < cold_engine.kv_counters().prefill_tokens,
                    "{what}: {hits:?}"
                );
                // A write into a shared or sealed block fails the step: none did.
                assert_eq!(warm_engine.stats().failed_steps, 0, "{what}");
                assert_eq!(
                    warm_engine.kv_used_bytes(),
                    0,
                    "{what}: blocks not given back"
                );
                if exit.is_some() {
                    let early = warm.iter().flatten().filter(|(_, l)| *l < 3).count();
                    assert!(early > 10, "{what}: the trace made {early} early exits");
                }
            }
        }
    }
}

#[test]
fn the_second_turn_of_a_conversation_reuses_the_first_turn_s_reply() {
    let model = tiny_recursive();
    let vocab = model.cfg.vocab_size as u32;
    let mut e = engine(&model, Scheduler::Cdb, 64, true);
    let prompt: Vec<u32> = (0..20u32).map(|j| (j * 7 + 1) % vocab).collect();
    let rx = submit(&mut e, 0, &prompt, params(30), None);
    e.run_until_idle();
    let reply = collect(&rx).tokens;
    let mut turn2 = prompt.clone();
    turn2.extend(&reply);
    turn2.extend([3, 4]);
    let before = e.kv_counters();
    let rx = submit(&mut e, 1, &turn2, params(4), None);
    e.run_until_idle();
    let got = collect(&rx);
    // 20 + 30 + 2 = 52 tokens: the first three blocks (48) held prompt and reply, computed at
    // full depth, so they are found whole.
    assert_eq!(got.cached_tokens, Some(48));
    assert_eq!(e.kv_counters().hit_tokens - before.hit_tokens, 48);
    assert_eq!(e.kv_counters().prefill_tokens - before.prefill_tokens, 4);
}

#[test]
fn with_the_prefix_cache_off_nothing_is_found() {
    let model = tiny_recursive();
    let (_, e) = chat_workload(
        engine(&model, Scheduler::Cdb, 64, false),
        &|_| params(4),
        None,
    );
    let c = e.kv_counters();
    assert_eq!((c.hit_tokens, e.kv_blocks().cached), (0, 0), "{c:?}");
    assert!(c.queried_tokens > 0);
}

/// Eight requests whose final lengths (50 positions, 4 blocks each) are far over a 12-block
/// pool, all submitted at once.
fn oversubscribed(vocab: u32) -> Vec<Vec<u32>> {
    (0..8u32)
        .map(|i| (0..20u32).map(|j| (i * 17 + j * 5 + 2) % vocab).collect())
        .collect()
}

#[test]
fn a_preempted_sequence_resumes_with_the_tokens_of_an_uninterrupted_one() {
    let model = tiny_recursive();
    let prompts = oversubscribed(model.cfg.vocab_size as u32);
    for scheduler in [Scheduler::Static, Scheduler::Csb, Scheduler::Cdb] {
        for (name, sampling) in [
            (
                "greedy",
                &(|_: u64| params(30)) as &dyn Fn(u64) -> GenParams,
            ),
            ("seeded", &|i| sampled(30, 7 + i)),
        ] {
            let run = |blocks: usize| {
                let mut e = engine(&model, scheduler, blocks, true);
                let rxs: Vec<_> = prompts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| submit(&mut e, i as u64, p, sampling(i as u64), None))
                    .collect();
                e.run_until_idle();
                let out: Vec<Vec<u32>> = rxs.iter().map(|rx| collect(rx).tokens).collect();
                (out, e)
            };
            let (want, roomy) = run(64);
            let (got, tight) = run(12);
            let what = format!("{scheduler:?} {name}");
            assert_eq!(roomy.kv_counters().preemptions, 0, "{what}");
            assert!(
                tight.kv_counters().preemptions > 0,
                "{what}: nothing was preempted"
            );
            assert_eq!(got, want, "{what}: preemption changed the output");
            assert!(want.iter().all(|t| t.len() == 30));
            assert_eq!(tight.stats().failed_steps, 0);
            assert_eq!(tight.kv_used_bytes(), 0);
        }
    }
}

#[test]
fn a_tiny_pool_under_four_times_its_load_finishes_every_request() {
    let model = tiny_recursive();
    let vocab = model.cfg.vocab_size as u32;
    let cosine = ExitPolicy {
        kind: ExitKind::Cosine,
        threshold: 0.6,
    };
    for (scheduler, exit) in [
        (Scheduler::Csb, None),
        (Scheduler::Cdb, None),
        (Scheduler::Cdb, Some(cosine)),
    ] {
        // 8 blocks (128 positions); 32 requests of 30-70 positions each: 4x what fits at once
        // even by prompts alone.
        let mut e = engine(&model, scheduler, 8, true);
        let rxs: Vec<_> = (0..32u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..10 + i % 21)
                    .map(|j| (i * 31 + j * 3 + 1) % vocab)
                    .collect();
                submit(
                    &mut e,
                    i as u64,
                    &prompt,
                    params(20 + (i as usize % 3) * 10),
                    exit,
                )
            })
            .collect();
        let mut steps = 0;
        while e.pending() > 0 {
            e.step();
            steps += 1;
            assert!(
                steps < 20_000,
                "{scheduler:?}: no progress after {steps} steps"
            );
        }
        for (i, rx) in rxs.iter().enumerate() {
            let got = collect(rx);
            assert_eq!(
                got.finish,
                Some(FinishReason::Length),
                "{scheduler:?} request {i}"
            );
            assert_eq!(got.tokens.len(), 20 + (i % 3) * 10);
        }
        assert!(e.kv_counters().preemptions > 0, "{scheduler:?} {exit:?}");
        assert_eq!(e.kv_used_bytes(), 0);
        assert_eq!(e.stats().failed_steps, 0);
    }
}

#[test]
fn a_request_that_fits_does_not_wait_behind_one_that_does_not() {
    let model = tiny_recursive();
    let mut e = engine(&model, Scheduler::Cdb, 8, false);
    // A holds 7 of the 8 blocks; B needs 7 too and waits; C needs one and runs at once.
    let a = submit(&mut e, 0, &[1; 100], params(10), None);
    let b = submit(&mut e, 1, &[2; 100], params(10), None);
    let c = submit(&mut e, 2, &[3; 5], params(10), None);
    e.step();
    let admitted =
        |rx: &Receiver<Event>| rx.try_iter().any(|ev| matches!(ev, Event::Admitted { .. }));
    assert!(admitted(&a));
    assert!(!admitted(&b), "B cannot fit yet");
    assert!(admitted(&c), "C fits and must not wait behind B");
    e.run_until_idle();
    for rx in [&a, &b, &c] {
        assert_eq!(collect(rx).finish, Some(FinishReason::Length));
    }
}

#[test]
fn the_least_important_running_request_is_preempted_first() {
    let model = tiny_recursive();
    let mut e = engine(&model, Scheduler::Cdb, 6, true);
    // Both take 3 blocks at admission; the pool is full; the first to grow forces a
    // preemption. A arrived first but asked for priority 5 (less important than B's 0).
    let mut first = |id: u64, priority: i32, token: u32| {
        let (mut req, rx) = Request::with_channel(id, vec![token; 40], params(30), None);
        req.priority = priority;
        e.submit(req);
        rx
    };
    let _a = first(0, 5, 1);
    let _b = first(1, 0, 2);
    while e.kv_counters().preemptions == 0 {
        assert!(e.pending() == 2, "both still running");
        e.step();
    }
    assert_eq!(
        e.waiting_ids(),
        vec![0],
        "A (priority 5) gives its blocks back"
    );
    e.run_until_idle();
}

#[test]
fn bad_kv_settings_and_requests_over_the_pool_are_clear_errors() {
    let model = tiny_recursive();
    let block = kv_block_bytes(&model);
    let with = |cfg: EngineConfig| Engine::new(model.clone(), cfg).err().map(|e| e.to_string());
    let zero = with(EngineConfig {
        kv_budget_bytes: 0,
        ..EngineConfig::default()
    })
    .expect("a zero budget is refused");
    assert!(
        zero.contains("holds no block") && zero.contains(&block.to_string()),
        "{zero}"
    );
    let odd = with(EngineConfig {
        kv_block_tokens: 24,
        ..EngineConfig::default()
    })
    .expect("a block of 24 is refused");
    assert!(odd.contains("multiple of 16"), "{odd}");
    let csb_exit = with(EngineConfig {
        scheduler: Scheduler::Csb,
        default_exit: ExitPolicy {
            kind: ExitKind::MaxProb,
            threshold: 0.9,
        },
        ..EngineConfig::default()
    })
    .expect("exits under CSB are refused");
    assert!(csb_exit.contains("depth-wise"), "{csb_exit}");
    // A request no pool state could ever hold fails at once, naming both sizes.
    let mut e = engine(&model, Scheduler::Cdb, 2, true);
    let rx = submit(&mut e, 0, &[1; 40], params(10), None);
    match rx.try_recv() {
        Ok(Event::Failed(err @ EngineError::KvBudget { .. })) => {
            let m = err.to_string();
            // 50 positions: 4 blocks, against a pool of 2.
            assert!(
                m.contains(&(4 * block).to_string()) && m.contains(&(2 * block).to_string()),
                "{m}"
            );
        }
        other => panic!("expected a KV budget refusal, got {other:?}"),
    }
    // So does an exit policy under a scheduler that would ignore it.
    let mut e = engine(&model, Scheduler::Csb, 8, true);
    let rx = submit(
        &mut e,
        0,
        &[1; 4],
        params(2),
        Some(ExitPolicy {
            kind: ExitKind::Margin,
            threshold: 0.5,
        }),
    );
    assert!(
        matches!(rx.try_recv(), Ok(Event::Failed(EngineError::Invalid(m))) if m.contains("depth-wise"))
    );
    assert_eq!(e.pending(), 0);
}

#[test]
fn bf16_kv_takes_half_the_bytes_a_token() {
    let model = tiny_recursive();
    let f32_layout = model.kv_layout(16, KvDtype::F32).unwrap();
    let bf16_layout = model.kv_layout(16, KvDtype::Bf16).unwrap();
    assert_eq!(
        2 * bf16_layout.bytes_per_token(),
        f32_layout.bytes_per_token()
    );
    // The same budget holds twice the blocks.
    let budget = 16 * f32_layout.block_bytes();
    let e = Engine::new(
        model.clone(),
        EngineConfig {
            kv_budget_bytes: budget,
            kv_dtype: KvDtype::Bf16,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert_eq!(e.kv_blocks().total, 32);
}

#[test]
fn int8_kv_is_a_little_over_a_quarter_of_f32_and_batching_or_the_prefix_cache_change_no_token() {
    let model = tiny_recursive();
    let f32_layout = model.kv_layout(16, KvDtype::F32).unwrap();
    let int8 = model.kv_layout(16, KvDtype::Int8).unwrap();
    // A byte an element, and an f32 scale per position and KV head, for K and for V.
    let c = &model.cfg;
    assert_eq!(
        int8.bytes_per_token(),
        int8.layers * 2 * (c.kv_dim() + 4 * c.num_kv_heads)
    );
    assert!(4 * int8.bytes_per_token() > f32_layout.bytes_per_token());
    assert!(3 * int8.bytes_per_token() < f32_layout.bytes_per_token());
    // Each row's K and V are quantized alone, so a row's tokens do not depend on what is
    // batched beside it, nor on whether its prefix came from the cache (sampled, so every
    // logit counts).
    let prompts = shared_prefix_prompts(c.vocab_size as u32);
    let run = |scheduler: Scheduler, max_sequences: usize, prefix_cache: bool| {
        let mut e = Engine::new(
            model.clone(),
            EngineConfig {
                scheduler,
                max_batch_rows: 24,
                max_sequences,
                kv_budget_bytes: 64 * int8.block_bytes(),
                kv_dtype: KvDtype::Int8,
                prefix_cache,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let rxs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| submit(&mut e, i as u64, p, sampled(8, i as u64), None))
            .collect();
        e.run_until_idle();
        assert_eq!(e.kv_used_bytes(), 0);
        rxs.iter().map(|rx| collect(rx).tokens).collect::<Vec<_>>()
    };
    let alone = run(Scheduler::Static, 1, false);
    assert!(alone.iter().all(|t| t.len() == 8));
    for scheduler in [Scheduler::Static, Scheduler::Csb, Scheduler::Cdb] {
        for prefix_cache in [false, true] {
            assert_eq!(
                run(scheduler, 8, prefix_cache),
                alone,
                "{scheduler:?}, prefix cache {prefix_cache}"
            );
        }
    }
}

#[test]
fn a_burst_of_requests_sharing_a_prefix_computes_it_once() {
    let model = tiny_recursive();
    let prompts = shared_prefix_prompts(model.cfg.vocab_size as u32);
    for scheduler in [Scheduler::Csb, Scheduler::Cdb] {
        let run = |prefix_cache: bool| {
            let mut e = engine(&model, scheduler, 64, prefix_cache);
            // All at once, on a cold cache.
            let rxs: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| submit(&mut e, i as u64, p, params(6), None))
                .collect();
            e.run_until_idle();
            let out: Vec<Vec<u32>> = rxs.iter().map(|rx| collect(rx).tokens).collect();
            (out, e.kv_counters())
        };
        let (cold, cold_kv) = run(false);
        let (warm, warm_kv) = run(true);
        assert_eq!(warm, cold, "{scheduler:?}");
        // The first computes the two shared full blocks; the seven others wait for them.
        assert_eq!(warm_kv.hit_tokens, 7 * 32, "{scheduler:?}: {warm_kv:?}");
        assert_eq!(
            warm_kv.prefill_tokens,
            cold_kv.prefill_tokens - 7 * 32,
            "{scheduler:?}"
        );
    }
}

/// The step counters the simulated worker's cost model is fitted on: every prompt row runs every
/// loop (a prefix-cache hit's rows do not run), and each row attends to the positions before
/// it and itself.
#[test]
fn prompt_rows_and_attended_positions_are_counted_per_loop() {
    let model = tiny_recursive();
    let loops = model.loops() as u64;
    let mut e = engine(&model, Scheduler::Cdb, 64, true);
    // 20 prompt tokens: one chunk of 20 rows (max 24 a step); no exits: every loop.
    let prompt: Vec<u32> = (1..=20).collect();
    let rx = submit(&mut e, 1, &prompt, params(3), None);
    e.run_until_idle();
    assert_eq!(collect(&rx).tokens.len(), 3);
    let s = e.stats().clone();
    assert_eq!(s.prompt_rows, 20 * loops);
    // Prompt rows 0..20 attend to 1..=20 positions: the chunk's count takes each row as
    // attending to the chunk's middle (start + ceil(len / 2) = 10 each). Then the first
    // sampled token (position 20) and the second (21) run every loop: 21 and 22 positions.
    assert_eq!(s.attended, (20 * 10 + 21 + 22) * loops);
    assert_eq!(s.loop_rows, (20 + 2) * loops);
    // The same prompt again: its one full block (16 of the 20 tokens) comes from the cache,
    // only the last 4 prompt rows run.
    let rx = submit(&mut e, 2, &prompt, params(1), None);
    e.run_until_idle();
    assert_eq!(collect(&rx).tokens.len(), 1);
    assert_eq!(e.stats().prompt_rows - s.prompt_rows, 4 * loops);
}
