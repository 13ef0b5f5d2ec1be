use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rrt_proto::v1 as pb;

use super::*;
use crate::pool::test_view as view;

fn pool(v: &pb::ClusterView, t: Instant) -> Pool<()> {
    let pool = Pool::new(Duration::from_secs(2));
    pool.apply_view(v, t, |_| Some(()), |_| false);
    pool
}

/// A balancer that counts a placed prefix as cached at once (`settle` zero).
fn balancer(balance: Balance) -> Balancer {
    Balancer::new(Settings {
        balance,
        settle: Duration::ZERO,
        ..Settings::default()
    })
}

fn ask<'a>(key: &'a Key, tokens: u32) -> Ask<'a> {
    Ask {
        model: "m",
        max_new_tokens: Some(tokens),
        key,
    }
}

/// A chat request's key: `system` prompt and `user` message.
fn chat(system: &str, user: &str) -> Key {
    Key::of_request(&pb::GenerateRequest {
        chat: true,
        messages: vec![
            pb::ChatMessage {
                role: "system".into(),
                content: system.into(),
            },
            pb::ChatMessage {
                role: "user".into(),
                content: user.into(),
            },
        ],
        ..Default::default()
    })
}

#[test]
fn power_of_two_prefers_the_lower_score_and_corrects_for_its_own_requests() {
    let t = Instant::now();
    let pool = pool(&view(&[("a", 0.0), ("b", 5.0)]), t);
    let b = balancer(Balance::PowerOfTwo);
    let mut rng = StdRng::seed_from_u64(1);
    let key = Key::default();
    let mut held = Vec::new();
    let mut order = String::new();
    for _ in 0..10 {
        let (g, route) = b.choose(&pool, &ask(&key, 64), t, &[], &mut rng).unwrap();
        assert_eq!(
            (route.policy, route.reason),
            (Balance::PowerOfTwo, Reason::Load)
        );
        order.push_str(&g.slot.id);
        held.push(g);
    }
    // a starts 5 s ahead; each request adds 64 x 2 / 100 = 1.28 s to its worker's load: a
    // takes four, then they alternate.
    assert_eq!(order, "aaaababababa"[..10].to_string());
    drop(held);
    assert!(pool
        .slots()
        .iter()
        .all(|s| s.in_flight.load(Ordering::Relaxed) == 0));
}

#[test]
fn an_idle_slow_worker_loses_to_a_faster_one_with_a_little_work() {
    let t = Instant::now();
    let mut v = view(&[("fast", 0.5), ("slow", 0.0)]);
    v.workers[0].loop_steps_per_second = 1000.0;
    v.workers[1].loop_steps_per_second = 100.0;
    let pool = pool(&v, t);
    let b = balancer(Balance::PowerOfTwo);
    let mut rng = StdRng::seed_from_u64(3);
    let key = Key::default();
    // 64 tokens x 2 loops: 0.128 s more on the fast worker, 1.28 s on the slow one.
    for _ in 0..4 {
        let (g, _) = b.choose(&pool, &ask(&key, 64), t, &[], &mut rng).unwrap();
        assert_eq!(g.slot.id, "fast");
    }
}

#[test]
fn a_stale_view_falls_back_to_own_least_outstanding_and_unknown_models_get_none() {
    let t = Instant::now();
    let pool = pool(&view(&[("a", 0.0), ("b", 100.0)]), t);
    let later = t + Duration::from_secs(3);
    let mut rng = StdRng::seed_from_u64(2);
    let key = Key::default();
    for policy in [
        Balance::PowerOfTwo,
        Balance::Combined,
        Balance::LeastOutstanding,
    ] {
        let b = balancer(policy);
        let (g1, r) = b
            .choose(&pool, &ask(&key, 8), later, &[], &mut rng)
            .unwrap();
        assert_eq!(r.reason, Reason::StaleView);
        let (g2, _) = b
            .choose(&pool, &ask(&key, 8), later, &[], &mut rng)
            .unwrap();
        assert_ne!(g1.slot.id, g2.slot.id, "least outstanding alternates");
        let other = Ask {
            model: "other",
            ..ask(&key, 8)
        };
        assert!(b.choose(&pool, &other, later, &[], &mut rng).is_none());
        drop((g1, g2));
        let (g3, _) = b
            .choose(&pool, &ask(&key, 8), later, &["a".into()], &mut rng)
            .unwrap();
        assert_eq!(g3.slot.id, "b");
    }
}

#[test]
fn round_robin_takes_turns_and_skips_draining_workers() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 9.0), ("c", 0.0)]);
    let b = balancer(Balance::RoundRobin);
    let mut rng = StdRng::seed_from_u64(0);
    let key = Key::default();
    let p = pool(&v, t);
    let ids: String = (0..6)
        .map(|_| {
            b.choose(&p, &ask(&key, 8), t, &[], &mut rng)
                .unwrap()
                .0
                .slot
                .id
                .clone()
        })
        .collect();
    assert_eq!(ids, "abcabc");
    v.workers[1].draining = true;
    p.apply_view(&v, t, |_| Some(()), |_| false);
    for _ in 0..4 {
        let (g, _) = b.choose(&p, &ask(&key, 8), t, &[], &mut rng).unwrap();
        assert_ne!(g.slot.id, "b");
    }
}

#[test]
fn least_outstanding_counts_every_routers_requests_from_the_view() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0)]);
    // Another router has 5 requests on a: this router has sent none yet.
    v.workers[0].running = 5;
    let p = pool(&v, t);
    let b = balancer(Balance::LeastOutstanding);
    let mut rng = StdRng::seed_from_u64(0);
    let key = Key::default();
    let mut held = Vec::new();
    let mut order = String::new();
    for _ in 0..7 {
        let (g, r) = b.choose(&p, &ask(&key, 8), t, &[], &mut rng).unwrap();
        assert_eq!(r.reason, Reason::Fewest);
        order.push_str(&g.slot.id);
        held.push(g);
    }
    assert_eq!(&order[..5], "bbbbb", "{order}");
}

#[test]
fn cache_aware_keeps_a_conversation_on_its_worker_until_that_worker_is_loaded() {
    let t = Instant::now();
    let ids: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
    let scores: Vec<(&str, f64)> = ids.iter().map(|i| (i.as_str(), 0.0)).collect();
    let p = pool(&view(&scores), t);
    let mut rng = StdRng::seed_from_u64(5);
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    for policy in [Balance::CacheAware, Balance::Combined] {
        let b = balancer(policy);
        let first = chat(&system, "What is a loop?");
        let (g, r) = b.choose(&p, &ask(&first, 16), t, &[], &mut rng).unwrap();
        assert_eq!(r.reason, Reason::NoPrefix);
        let home = g.slot.id.clone();
        drop(g);
        // Other users under the same system prompt, and the conversation's next turn.
        for user in ["What is a block?", "Why share layers?", "What is LoRA?"] {
            let (g, r) = b
                .choose(&p, &ask(&chat(&system, user), 16), t, &[], &mut rng)
                .unwrap();
            assert_eq!(
                (g.slot.id.as_str(), r.reason),
                (home.as_str(), Reason::PrefixHit)
            );
            assert!(r.predicted_hit > 0.8, "{}", r.predicted_hit);
        }
        // The holder gets busy (the view says 10 s of work): requests spill elsewhere.
        let mut v = view(&scores);
        let h = ids.iter().position(|i| *i == home).unwrap();
        v.workers[h].score = 10.0;
        p.apply_view(&v, t, |_| Some(()), |_| false);
        let (g, r) = b
            .choose(&p, &ask(&chat(&system, "Spill?"), 16), t, &[], &mut rng)
            .unwrap();
        assert_eq!(r.reason, Reason::SpillLoad, "{policy:?}");
        assert_ne!(g.slot.id, home);
        drop(g);
        // KV nearly full: spill, whatever the load.
        v.workers[h].score = 0.0;
        v.workers[h].kv_usage = 0.95;
        p.apply_view(&v, t, |_| Some(()), |_| false);
        let b2 = balancer(policy);
        b2.index.insert(&first.blocks, p.serving("m")[h].serial);
        let (g, r) = b2.choose(&p, &ask(&first, 16), t, &[], &mut rng).unwrap();
        assert_eq!(r.reason, Reason::SpillKv);
        assert_ne!(g.slot.id, home);
        p.apply_view(&view(&scores), t, |_| Some(()), |_| false);
    }
}

#[test]
fn affinity_holds_while_the_holder_is_within_the_slack_of_the_least_loaded() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]);
    let p = pool(&v, t);
    let mut rng = StdRng::seed_from_u64(9);
    let system = "x".repeat(4000);
    for (slack, holder_score, expect) in [
        // Default slack 0: equal loads keep the request on its holder; any extra load spills.
        (0.0, 0.0, ("a", Reason::PrefixHit)),
        (0.0, 0.2, ("b", Reason::SpillLoad)),
        // With a second of slack the holder keeps it up to a second more loaded.
        (1.0, 0.9, ("a", Reason::PrefixHit)),
        (1.0, 1.2, ("b", Reason::SpillLoad)),
    ] {
        let b = Balancer::new(Settings {
            balance: Balance::Combined,
            spill_s: slack,
            settle: Duration::ZERO,
            ..Settings::default()
        });
        b.index
            .insert(&chat(&system, "q").blocks, p.serving("m")[0].serial);
        v.workers[0].score = holder_score;
        v.workers[2].score = 0.5;
        p.apply_view(&v, t, |_| Some(()), |_| false);
        let (g, r) = b
            .choose(&p, &ask(&chat(&system, "q2"), 1), t, &[], &mut rng)
            .unwrap();
        assert_eq!(
            (g.slot.id.as_str(), r.reason),
            expect,
            "slack {slack}, holder {holder_score}"
        );
    }
}

#[test]
fn depth_aware_counts_a_hard_class_by_the_loops_it_takes() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0)]);
    for w in &mut v.workers {
        w.expected_loops = 2.0;
    }
    let p = pool(&v, t);
    let b = balancer(Balance::DepthAware);
    let (easy, hard) = (chat("easy", "e"), chat("hard", "h"));
    let route = |k: &Key| Route {
        policy: Balance::DepthAware,
        reason: Reason::Load,
        serial: 0,
        predicted_hit: 0.0,
        class: k.class,
        blocks: Vec::new(),
    };
    b.finished(&route(&easy), Some(1.0), 0, 0);
    b.finished(&route(&hard), Some(4.0), 0, 0);
    let mut rng = StdRng::seed_from_u64(4);
    // One hard request (100 tokens x 4 loops = 4 s) balances four easy ones (1 s each).
    let (h, _) = b.choose(&p, &ask(&hard, 100), t, &[], &mut rng).unwrap();
    let mut easy_on = Vec::new();
    for _ in 0..4 {
        let (g, _) = b.choose(&p, &ask(&easy, 100), t, &[], &mut rng).unwrap();
        easy_on.push(g);
    }
    assert!(easy_on.iter().all(|g| g.slot.id != h.slot.id));
    // 400 loop-steps of generation, plus its (estimated) prompt tokens through 2 loops.
    let prompt = hard.tokens() * 2.0;
    assert_eq!(
        h.slot.work_in_flight.load(Ordering::Relaxed),
        (400.0 + prompt).round() as u64,
        "the hard request's predicted loop-steps"
    );
    drop((h, easy_on));
    // Power of two counts both classes at the worker's mean (2 loops).
    let p2 = balancer(Balance::PowerOfTwo);
    p2.finished(&route(&hard), Some(4.0), 0, 0);
    let (g, _) = p2.choose(&p, &ask(&hard, 100), t, &[], &mut rng).unwrap();
    assert_eq!(
        g.slot.work_in_flight.load(Ordering::Relaxed),
        (200.0 + prompt).round() as u64
    );
}

#[test]
fn a_worker_whose_cache_missed_what_was_predicted_gets_less_credit() {
    let t = Instant::now();
    let p = pool(&view(&[("a", 0.0), ("b", 0.0)]), t);
    let b = balancer(Balance::CacheAware);
    let mut rng = StdRng::seed_from_u64(1);
    let system = "s".repeat(2000);
    let k = chat(&system, "q");
    let (g, r) = b.choose(&p, &ask(&k, 4), t, &[], &mut rng).unwrap();
    drop(g);
    let (g, r2) = b.choose(&p, &ask(&k, 4), t, &[], &mut rng).unwrap();
    assert_eq!(r2.reason, Reason::PrefixHit);
    assert_eq!(r2.serial, r.serial);
    let before = b.trust(r2.serial);
    // The worker reports nothing of it cached (evicted): its trust falls.
    b.finished(&r2, Some(2.0), 500, 0);
    assert!(b.trust(r2.serial) < before);
    drop(g);
    // A hit as predicted keeps it.
    let t1 = b.trust(r2.serial);
    b.finished(&r2, Some(2.0), 500, (500.0 * r2.predicted_hit) as u32);
    assert!(b.trust(r2.serial) > t1);
}

#[test]
fn metadata_calls_are_not_counted_as_routed_nor_indexed() {
    let t = Instant::now();
    let p = pool(&view(&[("a", 0.0)]), t);
    let b = balancer(Balance::Combined);
    let mut rng = StdRng::seed_from_u64(1);
    let k = chat(&"s".repeat(500), "q");
    let meta = Ask {
        max_new_tokens: None,
        ..ask(&k, 0)
    };
    let (g, r) = b.choose(&p, &meta, t, &[], &mut rng).unwrap();
    assert_eq!(r.reason, Reason::Metadata);
    assert_eq!(g.slot.routed.load(Ordering::Relaxed), 0);
    assert!(b.index.is_empty());
}

#[test]
fn router_replicas_send_a_new_system_prompt_to_the_same_worker_without_sharing_an_index() {
    let t = Instant::now();
    let ids: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    let scores: Vec<(&str, f64)> = ids.iter().map(|i| (i.as_str(), 0.0)).collect();
    // Two routers: their own pools (slot serials differ), indexes and random streams.
    let (p1, p2) = (pool(&view(&scores), t), pool(&view(&scores), t));
    let (mut r1, mut r2) = (StdRng::seed_from_u64(1), StdRng::seed_from_u64(2));
    let b1 = balancer(Balance::Combined);
    let b2 = balancer(Balance::Combined);
    let mut homes = std::collections::HashSet::new();
    for s in 0..16 {
        let system = format!("You are assistant {s}. ") + &"Answer briefly. ".repeat(20);
        let (g1, a) = b1
            .choose(&p1, &ask(&chat(&system, "first user"), 16), t, &[], &mut r1)
            .unwrap();
        let (g2, b) = b2
            .choose(
                &p2,
                &ask(&chat(&system, "second user"), 16),
                t,
                &[],
                &mut r2,
            )
            .unwrap();
        assert_eq!((a.reason, b.reason), (Reason::NoPrefix, Reason::NoPrefix));
        assert_eq!(g1.slot.id, g2.slot.id, "system prompt {s}");
        homes.insert(g1.slot.id.clone());
    }
    // The classes spread over the workers (not all on one).
    assert!(homes.len() >= 8, "{homes:?}");
}

#[test]
fn a_replica_routes_on_the_placements_another_shared() {
    let t = Instant::now();
    let ids: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    let scores: Vec<(&str, f64)> = ids.iter().map(|i| (i.as_str(), 0.0)).collect();
    let (pa, pb_) = (pool(&view(&scores), t), pool(&view(&scores), t));
    let mut rng = StdRng::seed_from_u64(3);
    let a = balancer(Balance::Combined);
    let b = balancer(Balance::Combined);
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    // Turn 1 on router a; a is asked to share what it placed.
    let turn1 = chat(&system, "What is a loop?");
    let (g, _) = a.choose(&pa, &ask(&turn1, 16), t, &[], &mut rng).unwrap();
    let home = g.slot.id.clone();
    drop(g);
    let shared = a.take_placements();
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].worker_id, home);
    assert_eq!(shared[0].blocks, turn1.blocks);
    assert!(a.take_placements().is_empty(), "taken once");
    // What a sends again is only what is new: the system prompt's blocks are known.
    let other = chat(
        &system,
        "Another user entirely, with a longer question than that.",
    );
    let (g, _) = a.choose(&pa, &ask(&other, 16), t, &[], &mut rng).unwrap();
    let again = a.take_placements();
    assert!(again[0].blocks.len() < other.blocks.len(), "{again:?}");
    drop(g);
    // Router b learns a's placements (its own batches it skips) ...
    let batch = |router: &str, placements| pb::PlacementBatch {
        router_id: router.into(),
        placements,
    };
    assert_eq!(b.learn(&pb_, &[batch(&b.router_id, shared.clone())]), 0);
    assert_eq!(
        b.learn(&pb_, &[batch(&a.router_id, shared)]),
        turn1.blocks.len()
    );
    // ... and sends the conversation's next turn to the same worker as a cache hit.
    let mut turn2 = turn1.clone();
    turn2.blocks.push(12345);
    turn2.bytes += 64;
    turn2.ends.push(turn2.bytes);
    let (g, r) = b.choose(&pb_, &ask(&turn2, 16), t, &[], &mut rng).unwrap();
    assert_eq!(
        (g.slot.id.as_str(), r.reason),
        (home.as_str(), Reason::PrefixHit)
    );
}

#[test]
fn a_conversations_next_turn_credits_its_ended_reply_on_the_holder() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]);
    let p = pool(&v, t);
    let mut rng = StdRng::seed_from_u64(4);
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    let msg = |role: &str, content: &str| pb::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let turn1 = vec![msg("system", &system), msg("user", "What is a loop?")];
    let mut turn2 = turn1.clone();
    // 200 bytes of reply: 50 tokens x 2 loops at 100 loop-steps/s = 1 s of work.
    turn2.push(msg("assistant", &"y".repeat(200)));
    turn2.push(msg("user", "And a block?"));
    let key = |messages: &[pb::ChatMessage]| {
        Key::of_request(&pb::GenerateRequest {
            chat: true,
            messages: messages.to_vec(),
            ..Default::default()
        })
    };
    // Another replica sent turn 1 to a; this one learned it, and its view still counts the
    // reply's work on a (0.9 s queued there).
    let b = balancer(Balance::Combined);
    b.index
        .insert(&key(&turn1).blocks, p.serving("m")[0].serial);
    v.workers[0].score = 0.9;
    p.apply_view(&v, t, |_| Some(()), |_| false);
    let (g, r) = b
        .choose(&p, &ask(&key(&turn2), 8), t, &[], &mut rng)
        .unwrap();
    assert_eq!((g.slot.id.as_str(), r.reason), ("a", Reason::PrefixHit));
    drop(g);
    // The same load with no reply to credit (another user's first turn under the same prompt,
    // or work more than the reply's): it spills.
    let other = key(&[msg("system", &system), msg("user", "What is LoRA?")]);
    let (g, r) = b.choose(&p, &ask(&other, 8), t, &[], &mut rng).unwrap();
    assert_eq!(r.reason, Reason::SpillLoad);
    assert_ne!(g.slot.id, "a");
    drop(g);
    v.workers[0].score = 1.5;
    p.apply_view(&v, t, |_| Some(()), |_| false);
    let (g, r) = b
        .choose(&p, &ask(&key(&turn2), 8), t, &[], &mut rng)
        .unwrap();
    assert_eq!(r.reason, Reason::SpillLoad);
    assert_ne!(g.slot.id, "a");
}

#[test]
fn a_burst_under_a_new_system_prompt_counts_its_prefills_until_the_prefix_settles() {
    let t = Instant::now();
    let ids: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
    let scores: Vec<(&str, f64)> = ids.iter().map(|i| (i.as_str(), 0.0)).collect();
    // 1,000 bytes: ~250 tokens, 500 loop-steps of prefill, 0.05 s at 10,000 loop-steps/s.
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    let mut v = view(&scores);
    for w in &mut v.workers {
        w.loop_steps_per_second = 10_000.0;
    }
    let mut on_first = Vec::new();
    for settle in [Duration::ZERO, Duration::from_millis(500)] {
        let p = pool(&v, t);
        let b = Balancer::new(Settings {
            balance: Balance::Combined,
            settle,
            ..Settings::default()
        });
        let mut rng = StdRng::seed_from_u64(2);
        // Twelve users at once under a prompt no worker has seen.
        let keys: Vec<Key> = (0..12).map(|i| chat(&system, &format!("Q{i}?"))).collect();
        let mut held = Vec::new();
        for k in &keys {
            let (g, r) = b.choose(&p, &ask(k, 8), t, &[], &mut rng).unwrap();
            if settle.is_zero() && r.reason == Reason::PrefixHit {
                assert!(r.predicted_hit > 0.8, "{r:?}");
            } else if !settle.is_zero() {
                // Placed this instant: the prompt is not cached anywhere yet.
                assert_eq!(r.predicted_hit, 0.0, "{r:?}");
            }
            held.push(g);
        }
        let first = held[0].slot.id.clone();
        on_first.push(held.iter().filter(|g| g.slot.id == first).count());
        let sent: Vec<String> = held.iter().map(|g| g.slot.id.clone()).collect();
        drop(held);
        // Once settled, the next user's request is predicted a hit where it goes.
        let later = t + Duration::from_secs(1);
        let (g, r) = b
            .choose(&p, &ask(&chat(&system, "Later?"), 8), later, &[], &mut rng)
            .unwrap();
        assert_eq!(r.reason, Reason::PrefixHit);
        assert!(sent.contains(&g.slot.id));
        assert!(r.predicted_hit > 0.8, "{r:?}");
    }
    // Counting the burst's prefills, the first worker leaves the slack after two (each
    // brings 0.05 s), not after all twelve.
    assert_eq!(on_first, [12, 2]);
}

#[test]
fn among_holders_of_a_prompt_the_one_sent_it_last_with_room_keeps_it() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]);
    let p = pool(&v, t);
    let mut rng = StdRng::seed_from_u64(6);
    let b = balancer(Balance::Combined);
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    let serial = |i: usize| p.serving("m")[i].serial;
    // b was sent the prompt after a (a's copy is the likelier to have been evicted since).
    b.index.insert(&chat(&system, "first").blocks, serial(0));
    b.index.insert(&chat(&system, "second").blocks, serial(1));
    let (g, r) = b
        .choose(&p, &ask(&chat(&system, "third"), 8), t, &[], &mut rng)
        .unwrap();
    assert_eq!((g.slot.id.as_str(), r.reason), ("b", Reason::PrefixHit));
    drop(g);
    // The last holder is loaded past the slack: the other holder keeps it, as a hit.
    v.workers[1].score = 5.0;
    p.apply_view(&v, t, |_| Some(()), |_| false);
    let (g, r) = b
        .choose(&p, &ask(&chat(&system, "fourth"), 8), t, &[], &mut rng)
        .unwrap();
    assert_eq!((g.slot.id.as_str(), r.reason), ("a", Reason::PrefixHit));
}

#[test]
fn a_holder_whose_cache_horizon_passed_the_prompt_is_not_predicted_to_hold_it() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0)]);
    let p = pool(&v, t);
    let mut rng = StdRng::seed_from_u64(7);
    let b = balancer(Balance::Combined);
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    let serial = |i: usize| p.serving("m")[i].serial;
    b.index
        .insert_at(&chat(&system, "first").blocks, serial(0), t);
    // a evicted nothing: it holds the prompt.
    let soon = t + Duration::from_secs(1);
    p.apply_view(&v, soon, |_| Some(()), |_| false);
    let (g, r) = b
        .choose(&p, &ask(&chat(&system, "second"), 8), soon, &[], &mut rng)
        .unwrap();
    assert_eq!((g.slot.id.as_str(), r.reason), ("a", Reason::PrefixHit));
    assert!(r.predicted_hit > 0.5, "{r:?}");
    drop(g);
    // 30 s on, a's cache has evicted what was last used before 10 s ago, on the
    // coordinator's clock (which reads 1,000 s): the prompt, last sent 29 s ago, is gone;
    // nobody holds it.
    let later = t + Duration::from_secs(30);
    v.clock_ms = 1_000_000;
    v.workers[0].prefix_cache_horizon_ms = Some(990_000);
    p.apply_view(&v, later, |_| Some(()), |_| false);
    let (_, r) = b
        .choose(&p, &ask(&chat(&system, "third"), 8), later, &[], &mut rng)
        .unwrap();
    assert_eq!(r.reason, Reason::NoPrefix);
    assert_eq!(r.predicted_hit, 0.0);
}

#[test]
fn the_quick_choices_skip_excluded_and_draining_workers() {
    let t = Instant::now();
    let mut v = view(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]);
    let p = pool(&v, t);
    let mut rng = StdRng::seed_from_u64(8);
    let key = Key::default();
    v.workers[2].draining = true;
    p.apply_view(&v, t, |_| Some(()), |_| false);
    for policy in [Balance::RoundRobin, Balance::PowerOfTwo] {
        let b = balancer(policy);
        for _ in 0..20 {
            let (g, _) = b
                .choose(&p, &ask(&key, 8), t, &["a".to_string()], &mut rng)
                .unwrap();
            assert_eq!(g.slot.id, "b", "{policy:?}");
        }
        // Every usable worker excluded: a draining one still serves.
        let (g, _) = b
            .choose(&p, &ask(&key, 8), t, &["a".into(), "b".into()], &mut rng)
            .unwrap();
        assert_eq!(g.slot.id, "c", "{policy:?}");
    }
}
