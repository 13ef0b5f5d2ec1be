//! The stop-sequence matcher on any stop sequences and any split of the generated text: what it
//! releases is exactly the text up to the first stop sequence (all of it without one), and no
//! part of a stop sequence is ever released.
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
    let stops: Vec<String> = parts[..n].iter().filter(|s| !s.is_empty()).cloned().collect();
    let pieces = &parts[n..];
    let text: String = pieces.concat();
    let mut matcher = StopMatcher::new(stops.clone());
    let mut released = String::new();
    let mut stopped = false;
    for piece in pieces {
        match matcher.push(piece) {
            Step::Emit(t) => released.push_str(&t),
            Step::Stop(t) => {
                released.push_str(&t);
                stopped = true;
                break;
            }
        }
    }
    let first_stop = stops.iter().filter_map(|s| text.find(s.as_str())).min();
    match first_stop {
        Some(at) => {
            assert!(stopped, "a stop sequence in {text:?} was missed");
            assert_eq!(released, text[..at]);
        }
        None => {
            assert!(!stopped);
            released.push_str(&matcher.flush());
            assert_eq!(released, text);
        }
    }
});
