//! The kinds of output constraint a request can carry and the llguidance grammar of each. JSON
//! is generated compact (`,` and `:` with no whitespace between tokens) unless the schema's own
//! `x-guidance` options say otherwise: a small model left free to emit whitespace can spend its
//! whole budget on it.

use llguidance::api::TopLevelGrammar;

/// Longest error message passed back to a client.
pub const MAX_MESSAGE: usize = 400;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConstraintError {
    /// The constraint does not compile (the client's fault): the compiler's message, bounded.
    #[error("{kind}: {message}")]
    Invalid { kind: &'static str, message: String },
    /// The model's vocabulary could not be set up for constrained decoding.
    #[error("constrained decoding is unavailable: {0}")]
    Setup(String),
}

/// `s` cut to [`MAX_MESSAGE`] bytes (at a character boundary).
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// What a request's output must follow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Spec {
    /// A JSON value valid under this JSON schema (its text).
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// The whole output matches this regular expression.
    Regex(String),
    /// The whole output is a sentence of this Lark grammar (llguidance's dialect).
    Lark(String),
}

impl Spec {
    /// The name of the kind, as errors and metrics say it.
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::JsonSchema(_) => "json_schema",
            Spec::JsonObject => "json_object",
            Spec::Regex(_) => "regex",
            Spec::Lark(_) => "grammar",
        }
    }

    fn invalid(&self, message: impl std::fmt::Display) -> ConstraintError {
        ConstraintError::Invalid {
            kind: self.kind(),
            message: bounded(&message.to_string()),
        }
    }

    /// The llguidance grammar of the constraint.
    pub fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        Ok(match self {
            Spec::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| self.invalid(format!("not JSON: {e}")))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(self.invalid("a JSON schema is an object (or true / false)"));
                }
                TopLevelGrammar::from_json_schema(compact(schema))
            }
            Spec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Spec::Regex(rx) => {
                if rx.is_empty() {
                    return Err(self.invalid("the regular expression is empty"));
                }
                TopLevelGrammar::from_regex(rx)
            }
            Spec::Lark(g) => {
                if g.trim().is_empty() {
                    return Err(self.invalid("the grammar is empty"));
                }
                TopLevelGrammar::from_lark(g.clone())
            }
        })
    }

    /// The error for a compiler failure of this constraint.
    pub fn compile_error(&self, e: impl std::fmt::Display) -> ConstraintError {
        self.invalid(e)
    }
}

/// Compact JSON unless the schema sets its own `x-guidance` options.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "item_separator": ",",
                "key_separator": ":",
                "whitespace_flexible": false
            })
        });
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_specs_are_refused_with_bounded_messages() {
        let e = Spec::JsonSchema("{not json".into()).grammar().unwrap_err();
        assert!(e.to_string().starts_with("json_schema: not JSON"), "{e}");
        assert!(Spec::JsonSchema("[1]".into()).grammar().is_err());
        assert!(Spec::Regex(String::new()).grammar().is_err());
        assert!(Spec::Lark(" ".into()).grammar().is_err());
        let long = "x".repeat(5000);
        assert!(bounded(&long).len() <= MAX_MESSAGE + 3);
        assert_eq!(bounded("é"), "é");
        let g = Spec::JsonSchema(r#"{"type":"integer"}"#.into())
            .grammar()
            .unwrap();
        let s = serde_json::to_string(&g).unwrap();
        assert!(s.contains("whitespace_flexible"), "{s}");
    }
}
