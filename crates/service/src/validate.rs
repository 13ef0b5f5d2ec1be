//! Request validation shared by the router (first line) and the worker (which also checks what
//! needs the tokenizer: the prompt fits the context). A rejection is INVALID_ARGUMENT with a
//! message for the caller and a short, bounded `reason` for metrics labels, carried in the
//! `rrt-reject-reason` trailer so the router can count what a worker rejected.

use rrt_proto::v1::{ExitPolicy, GenerateRequest, QualityTier};

/// The metadata key of a rejection's reason.
pub const REASON_KEY: &str = "rrt-reject-reason";

/// Most stop sequences per request, and bytes per stop sequence.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Largest constraint text (a JSON schema, regex or grammar).
pub const MAX_CONSTRAINT_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// A bounded label: `empty_prompt`, `max_new_tokens_zero`, ...
    pub reason: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

/// Longest message a status carries: user input quoted in it must not overflow a client's
/// header limit (grpc-message is a header), and a log line stays a line.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// The largest char boundary of `s` at or below `at` (`str::floor_char_boundary`, newer than
/// this workspace's MSRV).
fn floor_char_boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// User input as a message quotes it: Debug-escaped, cut to 64 bytes with the full length after.
pub fn quote(input: &str) -> String {
    const SHOWN: usize = 64;
    if input.len() <= SHOWN {
        return format!("{input:?}");
    }
    let cut = floor_char_boundary(input, SHOWN);
    format!("{:?}... ({} bytes)", &input[..cut], input.len())
}

/// `message` cut to [`MAX_MESSAGE_BYTES`] on a character boundary.
pub fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let cut = floor_char_boundary(&message, MAX_MESSAGE_BYTES - 3);
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

impl From<Rejection> for tonic::Status {
    fn from(r: Rejection) -> Self {
        let mut status = tonic::Status::invalid_argument(bounded(r.message));
        if let Ok(v) = r.reason.parse() {
            status.metadata_mut().insert(REASON_KEY, v);
        }
        status
    }
}

/// The reason label of an INVALID_ARGUMENT status from a peer (`other` when it names none).
pub fn reason_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(REASON_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 40 && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .unwrap_or("other")
        .to_string()
}

/// Checks everything about a generation request that needs no tokenizer. `max_new_tokens` is
/// the server's limit.
pub fn generate_request(req: &GenerateRequest, max_new_tokens: u32) -> Result<(), Rejection> {
    if req.messages.is_empty() && req.prompt.is_empty() {
        return Err(Rejection::new(
            "empty_prompt",
            "prompt must not be empty (or give messages)",
        ));
    }
    if !req.messages.is_empty() && !req.prompt.is_empty() {
        return Err(Rejection::new(
            "prompt_and_messages",
            "give either prompt or messages, not both",
        ));
    }
    if let Some(i) = req.messages.iter().position(|m| m.role.is_empty()) {
        return Err(Rejection::new(
            "bad_message",
            format!("messages[{i}] has an empty role"),
        ));
    }
    if req.max_new_tokens == 0 {
        return Err(Rejection::new(
            "max_new_tokens_zero",
            "max_new_tokens must be at least 1",
        ));
    }
    if req.max_new_tokens > max_new_tokens {
        return Err(Rejection::new(
            "max_new_tokens_over_limit",
            format!(
                "max_new_tokens {} is above this server's limit of {max_new_tokens}",
                req.max_new_tokens
            ),
        ));
    }
    if req.resume_token_ids.len() > req.max_new_tokens as usize {
        return Err(Rejection::new(
            "bad_resume",
            format!(
                "{} resumed tokens are more than max_new_tokens {}",
                req.resume_token_ids.len(),
                req.max_new_tokens
            ),
        ));
    }
    if let Some(s) = &req.sampling {
        let t = s.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Rejection::new(
                "bad_temperature",
                format!("temperature must be finite and >= 0, got {t}"),
            ));
        }
        let p = s.top_p;
        if p != 0.0 && !(p > 0.0 && p <= 1.0) {
            return Err(Rejection::new(
                "bad_top_p",
                format!("top_p must be in (0, 1] (0 = unset), got {p}"),
            ));
        }
        let r = s.repetition_penalty;
        if !r.is_finite() || r < 0.0 {
            return Err(Rejection::new(
                "bad_repetition_penalty",
                format!("repetition_penalty must be > 0 (0 = unset), got {r}"),
            ));
        }
    }
    if let Some(e) = &req.exit {
        if ExitPolicy::try_from(e.policy).is_err() {
            return Err(Rejection::new(
                "bad_exit_policy",
                format!("unknown exit policy {}", e.policy),
            ));
        }
        let t = e.threshold;
        if !(0.0..=1.0).contains(&t) {
            return Err(Rejection::new(
                "bad_exit_threshold",
                format!("exit threshold must be in [0, 1], got {t}"),
            ));
        }
    }
    match QualityTier::try_from(req.quality) {
        Err(_) => {
            return Err(Rejection::new(
                "bad_quality",
                format!("unknown quality tier {}", req.quality),
            ))
        }
        Ok(QualityTier::Full)
            if req.exit.as_ref().is_some_and(|e| {
                !matches!(
                    ExitPolicy::try_from(e.policy),
                    Ok(ExitPolicy::Unspecified | ExitPolicy::None)
                )
            }) =>
        {
            return Err(Rejection::new(
                "bad_quality",
                "quality FULL runs every loop: it takes no exit policy (leave exit unset)",
            ))
        }
        Ok(_) => {}
    }
    if let Some(c) = &req.constraint {
        use rrt_proto::v1::output_constraint::Kind;
        match &c.kind {
            None => {
                return Err(Rejection::new(
                    "bad_constraint",
                    "constraint is set but names no kind (json_schema, json_object, regex, lark_grammar)",
                ))
            }
            Some(Kind::JsonObject(false)) => {
                return Err(Rejection::new(
                    "bad_constraint",
                    "constraint.json_object must be true when it is the kind",
                ))
            }
            Some(Kind::JsonSchema(t) | Kind::Regex(t) | Kind::LarkGrammar(t))
                if t.len() > MAX_CONSTRAINT_BYTES =>
            {
                return Err(Rejection::new(
                    "bad_constraint",
                    format!(
                        "the constraint is {} bytes; at most {MAX_CONSTRAINT_BYTES}",
                        t.len()
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if req.stop.len() > MAX_STOPS {
        return Err(Rejection::new(
            "bad_stop",
            format!("at most {MAX_STOPS} stop sequences, got {}", req.stop.len()),
        ));
    }
    if let Some(s) = req
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(Rejection::new(
            "bad_stop",
            format!(
                "stop sequences must be 1..={MAX_STOP_BYTES} bytes, got {} bytes",
                s.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rrt_proto::v1::{ExitParameters, SamplingParameters};

    use super::*;

    fn ok() -> GenerateRequest {
        GenerateRequest {
            prompt: "hi".into(),
            max_new_tokens: 8,
            ..Default::default()
        }
    }

    fn reason(req: GenerateRequest) -> &'static str {
        generate_request(&req, 64).unwrap_err().reason
    }

    #[test]
    fn each_bad_field_is_rejected_with_its_reason() {
        assert_eq!(generate_request(&ok(), 64), Ok(()));
        let sampling = |f: fn(&mut SamplingParameters)| {
            let mut s = SamplingParameters::default();
            f(&mut s);
            GenerateRequest {
                sampling: Some(s),
                ..ok()
            }
        };
        assert_eq!(
            reason(GenerateRequest {
                prompt: String::new(),
                ..ok()
            }),
            "empty_prompt"
        );
        assert_eq!(
            reason(GenerateRequest {
                max_new_tokens: 0,
                ..ok()
            }),
            "max_new_tokens_zero"
        );
        assert_eq!(
            reason(GenerateRequest {
                max_new_tokens: 65,
                ..ok()
            }),
            "max_new_tokens_over_limit"
        );
        assert_eq!(
            reason(GenerateRequest {
                resume_token_ids: vec![1; 9],
                ..ok()
            }),
            "bad_resume"
        );
        assert_eq!(
            reason(sampling(|s| s.temperature = f32::NAN)),
            "bad_temperature"
        );
        assert_eq!(
            reason(sampling(|s| s.temperature = -0.5)),
            "bad_temperature"
        );
        assert_eq!(reason(sampling(|s| s.top_p = 1.5)), "bad_top_p");
        assert_eq!(reason(sampling(|s| s.top_p = -0.1)), "bad_top_p");
        assert_eq!(reason(sampling(|s| s.top_p = f32::NAN)), "bad_top_p");
        assert_eq!(
            reason(sampling(|s| s.repetition_penalty = f32::INFINITY)),
            "bad_repetition_penalty"
        );
        assert_eq!(
            reason(GenerateRequest {
                exit: Some(ExitParameters {
                    policy: 2,
                    threshold: 1.5
                }),
                ..ok()
            }),
            "bad_exit_threshold"
        );
        assert_eq!(
            reason(GenerateRequest {
                exit: Some(ExitParameters {
                    policy: 99,
                    threshold: 0.5
                }),
                ..ok()
            }),
            "bad_exit_policy"
        );
        assert_eq!(
            reason(GenerateRequest {
                stop: vec![String::new()],
                ..ok()
            }),
            "bad_stop"
        );
        assert_eq!(
            reason(GenerateRequest { quality: 7, ..ok() }),
            "bad_quality"
        );
        assert_eq!(
            reason(GenerateRequest {
                quality: QualityTier::Full as i32,
                exit: Some(ExitParameters {
                    policy: ExitPolicy::Learned as i32,
                    threshold: 0.5
                }),
                ..ok()
            }),
            "bad_quality"
        );
        use rrt_proto::v1::{output_constraint::Kind, OutputConstraint};
        let constrained = |kind| GenerateRequest {
            constraint: Some(OutputConstraint { kind }),
            ..ok()
        };
        assert_eq!(reason(constrained(None)), "bad_constraint");
        assert_eq!(
            reason(constrained(Some(Kind::JsonObject(false)))),
            "bad_constraint"
        );
        assert_eq!(
            reason(constrained(Some(Kind::Regex("a".repeat(70_000))))),
            "bad_constraint"
        );
        assert_eq!(
            generate_request(&constrained(Some(Kind::Regex("[0-9]+".into()))), 64),
            Ok(())
        );
        let full = GenerateRequest {
            quality: QualityTier::Full as i32,
            ..ok()
        };
        assert_eq!(generate_request(&full, 64), Ok(()));
        // Unset sampling fields (0) are defaults, not errors.
        assert_eq!(generate_request(&sampling(|_| {}), 64), Ok(()));
    }

    #[test]
    fn the_reason_travels_in_the_status_metadata() {
        let status: tonic::Status =
            Rejection::new("empty_prompt", "prompt must not be empty").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(reason_of(&status), "empty_prompt");
        assert_eq!(reason_of(&tonic::Status::invalid_argument("x")), "other");
    }

    #[test]
    fn user_input_in_messages_is_bounded() {
        assert_eq!(quote("llama"), "\"llama\"");
        let long = "é".repeat(5000);
        let q = quote(&long);
        assert!(q.len() < 100 && q.ends_with("(10000 bytes)"), "{q}");
        let status = tonic::Status::from(Rejection::new("unknown_model", format!("x {long}")));
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            status.message().len()
        );
        assert!(status.message().ends_with("..."));
    }
}
