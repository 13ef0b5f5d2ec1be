use std::sync::mpsc::Receiver;

use rrt_engine::{ExitPolicy, GenParams};

use super::*;

fn config(f: impl FnOnce(&mut SimConfig)) -> SimConfig {
    let mut c = SimConfig {
        clock: Clock::Virtual,
        ..SimConfig::default()
    };
    f(&mut c);
    c
}

fn request(id: u64, prompt: Vec<u32>, max_new: usize) -> (Request, Receiver<Event>) {
    Request::with_channel(
        id,
        prompt,
        GenParams {
            max_new_tokens: max_new,
            ..GenParams::default()
        },
        None,
    )
}

fn run_until_idle(e: &mut SimEngine) {
    let mut guard = 0;
    while e.pending() > 0 {
        e.step();
        guard += 1;
        assert!(guard < 100_000, "the engine does not finish");
    }
}

/// Submits `n` requests with distinct 40-token prompts and runs the engine until they are done.
fn run_distinct(e: &mut SimEngine, n: u64, max_new: usize) -> Vec<Receiver<Event>> {
    let rxs = (0..n)
        .map(|i| {
            let (req, rx) = request(i, vec![1 + i as u32; 40], max_new);
            e.submit(req);
            rx
        })
        .collect();
    run_until_idle(e);
    rxs
}

/// (cached tokens at admission, exit loops, finished).
fn events(rx: &Receiver<Event>) -> (Option<usize>, Vec<usize>, bool) {
    let (mut cached, mut loops, mut finished) = (None, Vec::new(), false);
    for ev in rx.try_iter() {
        match ev {
            Event::Admitted { cached_tokens } => cached = Some(cached_tokens),
            Event::Token { exit_loop, .. } => loops.push(exit_loop),
            Event::Finished { .. } => finished = true,
            Event::Failed(e) => panic!("failed: {e}"),
        }
    }
    (cached, loops, finished)
}

#[test]
fn requests_get_their_tokens_with_exits_drawn_from_the_distribution() {
    let mut e = SimEngine::new(config(|c| {
        c.loops = 3;
        c.exit_probs = vec![0.5, 0.25];
    }));
    let rxs = run_distinct(&mut e, 20, 100);
    let mut all = Vec::new();
    for rx in &rxs {
        let (cached, loops, finished) = events(rx);
        assert_eq!(cached, Some(0));
        assert_eq!(loops.len(), 100);
        assert!(finished);
        assert_eq!(
            loops[0], 3,
            "the first token comes out of the prefill's last loop"
        );
        all.extend(&loops[1..]);
    }
    assert!(all.iter().all(|&l| (1..=3).contains(&l)));
    // Expected mean exit loop: 0.5 x 1 + 0.25 x 2 + 0.25 x 3 = 1.75.
    let mean = all.iter().sum::<usize>() as f64 / all.len() as f64;
    assert!((mean - 1.75).abs() < 0.05, "{mean}");
    assert_eq!(e.stats().tokens, 2000);
    assert_eq!(e.snapshot(0.0).kv_blocks.used, 0, "every block back");
}

#[test]
fn measured_curves_move_the_depths_with_the_threshold_and_later_exits_take_what_is_left() {
    use rrt_proto::v1::{ExitCurve, ExitCurvePoint};
    let curve = |after_loop: u32, low: f64, high: f64| ExitCurve {
        after_loop,
        points: vec![
            ExitCurvePoint {
                threshold: 0.5,
                exit_rate: low,
                agreement: 0.9,
            },
            ExitCurvePoint {
                threshold: 0.9,
                exit_rate: high,
                agreement: 0.99,
            },
        ],
    };
    // Exit 1 takes 40% (10% at 0.9); exit 2, measured alone, 60% (20%): by loop 2 the
    // highest of the two has left.
    let mean_at = |threshold: f32, cascade: &[rrt_proto::v1::ExitCascadePoint]| {
        let mut e = SimEngine::new(config(|c| {
            c.loops = 3;
            c.exits.curves = vec![curve(1, 0.4, 0.1), curve(2, 0.6, 0.2)];
            c.exits.cascade = cascade.to_vec();
            c.default_exit = ExitPolicy {
                kind: rrt_engine::ExitKind::Learned,
                threshold,
            };
        }));
        let rxs = run_distinct(&mut e, 20, 200);
        let all: Vec<usize> = rxs
            .iter()
            .flat_map(|rx| events(rx).1[1..].to_vec())
            .collect();
        all.iter().sum::<usize>() as f64 / all.len() as f64
    };
    // 0.4 x 1 + 0.2 x 2 + 0.4 x 3 = 2.0; at 0.9: 0.1 x 1 + 0.1 x 2 + 0.8 x 3 = 2.7.
    let (low, high) = (mean_at(0.5, &[]), mean_at(0.9, &[]));
    assert!((low - 2.0).abs() < 0.05, "{low}");
    assert!((high - 2.7).abs() < 0.05, "{high}");
    // Measured as a cascade the exits are read as they are: at 0.5, 40% leave at exit 1 and
    // 40% more at exit 2: 0.4 x 1 + 0.4 x 2 + 0.2 x 3 = 1.8.
    let cascade = |threshold: f32, shares: Vec<f64>| rrt_proto::v1::ExitCascadePoint {
        threshold,
        exit_share: shares,
        agreement: 0.8,
    };
    let measured = mean_at(
        0.5,
        &[cascade(0.5, vec![0.4, 0.4]), cascade(0.9, vec![0.1, 0.1])],
    );
    assert!((measured - 1.8).abs() < 0.05, "{measured}");
}

#[test]
fn a_repeated_prefix_is_a_cache_hit_and_is_not_prefilled_again() {
    let mut e = SimEngine::new(config(|_| {}));
    let system: Vec<u32> = (1000..1200).collect();
    let (a, rx_a) = request(1, [system.clone(), vec![5; 10]].concat(), 4);
    e.submit(a);
    run_until_idle(&mut e);
    let (b, rx_b) = request(2, [system.clone(), vec![6; 10]].concat(), 4);
    e.submit(b);
    run_until_idle(&mut e);
    assert_eq!(events(&rx_a).0, Some(0));
    // 200 shared tokens: 12 full blocks of 16.
    assert_eq!(events(&rx_b).0, Some(192));
    let c = e.kv_counters();
    assert_eq!((c.queried_tokens, c.hit_tokens), (420, 192));
    assert_eq!(c.prefill_tokens, 420 - 192);
}

#[test]
fn step_time_follows_the_cost_model() {
    let cost = CostModel {
        base_s: 0.01,
        loop_row_s: 0.001,
        prompt_row_s: 0.0,
        head_row_s: 0.0,
        kv_k_s: 0.0,
    };
    let mut e = SimEngine::new(config(|c| {
        c.cost = cost;
        c.loops = 2;
        c.exit_probs = vec![0.0];
        c.speed = 2.0;
    }));
    let (req, _rx) = request(1, vec![7; 10], 5);
    e.submit(req);
    run_until_idle(&mut e);
    // Steps 1-2: the 10-row prompt chunk through loops 1 and 2 (the first token leaves after
    // loop 2); then each of 4 tokens one row through two steps: 10 steps, 28 rows.
    let expected = 10.0 * 0.01 + 28.0 * 0.001;
    assert!((e.elapsed - expected / 2.0).abs() < 1e-12, "{}", e.elapsed);
}

#[test]
fn a_hard_class_goes_one_loop_deeper_and_no_exit_means_full_depth() {
    let mut e = SimEngine::new(config(|c| {
        c.loops = 3;
        c.exit_probs = vec![1.0];
        c.hard_share = 1.0;
    }));
    let (hard, rx_h) = request(1, vec![3; 20], 20);
    let (mut full, rx_f) = request(2, vec![4; 20], 20);
    full.exit = Some(ExitPolicy {
        kind: ExitKind::None,
        threshold: 0.0,
    });
    e.submit(hard);
    e.submit(full);
    run_until_idle(&mut e);
    assert!(events(&rx_h).1[1..].iter().all(|&l| l == 2));
    assert!(events(&rx_f).1.iter().all(|&l| l == 3));
}

#[test]
fn kv_blocks_and_sequences_bound_admission_and_cancelled_requests_leave() {
    let mut e = SimEngine::new(config(|c| {
        c.kv_blocks = 10;
        c.max_sequences = 4;
    }));
    // Each prompt needs 8 blocks (112 tokens + 1): only one fits at a time.
    let (a, rx_a) = request(1, vec![1; 112], 8);
    let (b, rx_b) = request(2, vec![2; 112], 8);
    e.submit(a);
    e.submit(b);
    e.step();
    let s = e.snapshot(0.0);
    assert_eq!((s.running, s.queue_length), (1, 1));
    // The client goes away: the request leaves when the engine next talks to it.
    drop(rx_b);
    run_until_idle(&mut e);
    assert_eq!(e.stats().cancelled, 1);
    assert!(events(&rx_a).2);
    let s = e.snapshot(0.0);
    assert_eq!((s.running, s.queue_length, s.kv_blocks.used), (0, 0, 0));
}

#[test]
fn sequences_that_outgrow_the_pool_are_preempted_and_all_finish() {
    // 16 blocks of 16 tokens; four sequences of 32 prompt tokens and 96 new tokens each need 8
    // blocks at the end: all four admit (3 blocks each), then run out while decoding.
    let mut e = SimEngine::new(config(|c| {
        c.kv_blocks = 16;
        c.block_tokens = 16;
    }));
    let mut rxs = Vec::new();
    for i in 0..4 {
        let (req, rx) = request(i, vec![10 + i as u32; 32], 96);
        e.submit(req);
        rxs.push(rx);
    }
    run_until_idle(&mut e);
    for rx in &rxs {
        let (cached, loops, finished) = events(rx);
        assert_eq!(cached, Some(0), "announced once, at the first admission");
        assert_eq!(loops.len(), 96, "every token came, once");
        assert!(finished);
    }
    assert!(e.kv_counters().preemptions > 0, "the pool ran out");
    assert_eq!(e.cache.used(), 0, "every block went back");
}

#[test]
fn a_request_the_whole_pool_cannot_hold_fails_at_once() {
    let mut e = SimEngine::new(config(|c| {
        c.kv_blocks = 8;
        c.block_tokens = 16;
    }));
    let (req, rx) = request(1, vec![5; 100], 100);
    e.submit(req);
    assert_eq!(e.pending(), 0);
    match rx.try_recv() {
        Ok(Event::Failed(err)) => assert!(err.to_string().contains("whole pool is 8"), "{err}"),
        other => panic!("{other:?}"),
    }
}
