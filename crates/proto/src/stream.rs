//! The typed reading of a `GenerateStreamResponse`, so no caller decodes the wire convention
//! itself: a message carries a generated token when its `exit_loop` is set (every token exits
//! after some loop >= 1), and the finish reason on the last message (which may carry a token,
//! e.g. the one that completed a stop sequence, or none).

use crate::v1 as pb;

/// A generated token as a stream message carries it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Token {
    pub id: u32,
    /// The loop (1-based) the token exited after.
    pub exit_loop: u32,
    /// The token's log-probability, when the request asked for it.
    pub logprob: Option<f32>,
}

impl pb::GenerateStreamResponse {
    /// A message carrying `token`, the text it adds and its index among the generated tokens.
    pub fn token_message(text: String, token: Token, index: u32) -> Self {
        Self {
            text,
            token_id: token.id,
            exit_loop: token.exit_loop.max(1),
            finish_reason: 0,
            index,
            logprob: token.logprob,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
        }
    }

    /// The last message without a token: the text still held back, and why generation ended.
    pub fn finish_message(text: String, reason: pb::FinishReason, index: u32) -> Self {
        Self {
            text,
            finish_reason: reason as i32,
            index,
            ..Default::default()
        }
    }

    /// Marks the message as the last one.
    pub fn finishing(mut self, reason: pb::FinishReason) -> Self {
        self.finish_reason = reason as i32;
        self
    }

    /// The token this message carries, if any.
    pub fn token(&self) -> Option<Token> {
        (self.exit_loop != 0).then_some(Token {
            id: self.token_id,
            exit_loop: self.exit_loop,
            logprob: self.logprob,
        })
    }

    /// Why generation ended, on the last message; `None` before it.
    pub fn finish(&self) -> Option<pb::FinishReason> {
        match pb::FinishReason::try_from(self.finish_reason) {
            Ok(pb::FinishReason::Unspecified) => None,
            Ok(reason) => Some(reason),
            // An unknown (newer) reason still ends the stream.
            Err(_) => Some(pb::FinishReason::Unspecified),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_finish_messages_read_back() {
        let t = Token {
            id: 42,
            exit_loop: 2,
            logprob: Some(-0.5),
        };
        let m = pb::GenerateStreamResponse::token_message("hi".into(), t, 3);
        assert_eq!((m.token(), m.finish(), m.index), (Some(t), None, 3));
        let m = m.finishing(pb::FinishReason::Stop);
        assert_eq!(m.finish(), Some(pb::FinishReason::Stop));
        let end =
            pb::GenerateStreamResponse::finish_message(String::new(), pb::FinishReason::Eos, 4);
        assert_eq!(
            (end.token(), end.finish()),
            (None, Some(pb::FinishReason::Eos))
        );
        let odd = pb::GenerateStreamResponse {
            finish_reason: 99,
            ..Default::default()
        };
        assert!(
            odd.finish().is_some(),
            "an unknown reason still ends the stream"
        );
    }
}
