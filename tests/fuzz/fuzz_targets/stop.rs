//! The stop-sequence matcher on any stop sequences and any split of the generated text: it stops
//! at the piece where a stop sequence first appears and releases exactly the text before the
//! earliest one (all of the text without one); no part of a stop sequence is released before.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrt_worker::stop::{Step, StopMatcher};

fuzz_target!(|data: &[u8]| {
    // Layout: stop sequences and text pieces separated by 0xFF; the first byte says how many of
    // the leading parts (0-3) are stop sequences.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let parts: Vec<String> = rest
        .split(|&b| b == 0xFF)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let n = (n as usize % 4).min(parts.len());
    let stops: Vec<String> = parts[..n]
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    let pieces = &parts[n..];
    let mut matcher = StopMatcher::new(stops.clone());
    let mut released = String::new();
    // The reference: after each piece, the earliest stop sequence anywhere in the text so far
    // ends generation, and exactly the text before it is released.
    let mut text = String::new();
    for piece in pieces {
        text.push_str(piece);
        let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
        match (matcher.push(piece), first) {
            (Step::Emit(t), None) => released.push_str(&t),
            (Step::Stop(t), Some(at)) => {
                released.push_str(&t);
                assert_eq!(released, text[..at], "released up to the stop sequence");
                return;
            }
            (step, first) => panic!("matcher {step:?}, reference stop at {first:?} in {text:?}"),
        }
        assert!(
            text.starts_with(&released),
            "released text is the text's start"
        );
    }
    released.push_str(&matcher.flush());
    assert_eq!(released, text, "without a stop, all of the text");
});
