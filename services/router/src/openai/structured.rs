//! The OpenAI request fields that shape the output beyond sampling: `response_format`
//! (`text`, `json_object`, `json_schema` with its schema) becomes the request's output
//! constraint, which the worker compiles and decodes under; and the fields rrt does not honour,
//! refused with a 400 that names them rather than silently ignored. Fields that change nothing
//! (`user`, `metadata`, ...) and neutral values (`presence_penalty: 0`, `logit_bias: {}`) pass.

use rrt_proto::v1 as pb;
use rrt_proto::v1::output_constraint::Kind;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema`: rrt reads the schema (`name` and `description` are labels;
/// `strict` or not, it always decodes under the schema).
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub schema: Option<Value>,
}

/// The output constraint `response_format` asks for (`None`: free text).
pub fn constraint(rf: Option<&ResponseFormat>) -> Result<Option<pb::OutputConstraint>, ApiError> {
    let Some(rf) = rf else {
        return Ok(None);
    };
    let kind = match rf.kind.as_str() {
        "text" => return Ok(None),
        "json_object" => Kind::JsonObject(true),
        "json_schema" => {
            let Some(js) = &rf.json_schema else {
                return Err(ApiError::bad_request(
                    "response_format.json_schema is required when type is json_schema",
                    Some("response_format"),
                ));
            };
            let schema = js.schema.clone().unwrap_or_else(|| serde_json::json!({}));
            Kind::JsonSchema(schema.to_string())
        }
        other => {
            return Err(ApiError::bad_request(
                format!(
                    "response_format.type {}: one of text, json_object, json_schema",
                    rrt_service::validate::quote(other)
                ),
                Some("response_format"),
            ))
        }
    };
    Ok(Some(pb::OutputConstraint { kind: Some(kind) }))
}

/// Fields accepted and ignored: they change nothing about the output.
const INERT: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Whether `value` of field `name` is the neutral one (changes nothing).
fn neutral(name: &str, value: &Value) -> bool {
    match name {
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0) || value.is_null(),
        "logit_bias" => value.is_null() || value.as_object().is_some_and(Map::is_empty),
        "best_of" => value.is_null() || value.as_u64() == Some(1),
        "suffix" | "stop" => value.is_null(),
        _ => value.is_null(),
    }
}

/// What rrt says about a field it does not honour.
fn why(name: &str) -> &'static str {
    match name {
        "tools" | "tool_choice" => "tools are for /v1/chat/completions",
        "functions" | "function_call" => "the deprecated functions API: use tools and tool_choice",
        "presence_penalty" | "frequency_penalty" | "logit_bias" => {
            "only its neutral value is supported (rrt has repetition_penalty through gRPC)"
        }
        "best_of" => "rrt returns one choice per request (best_of = 1)",
        "suffix" => "suffix (insertion) is not supported",
        _ => "not supported by rrt",
    }
}

/// Refuses the first request field (besides the ones rrt reads) that would change the output.
pub fn refuse_unknown(extra: &Map<String, Value>) -> Result<(), ApiError> {
    let mut names: Vec<&String> = extra.keys().collect();
    names.sort();
    for name in names {
        if INERT.contains(&name.as_str()) || neutral(name, &extra[name]) {
            continue;
        }
        return Err(ApiError::bad_field(
            format!("{}: {}", rrt_service::validate::quote(name), why(name)),
            name.clone(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rf(v: Value) -> ResponseFormat {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn response_formats_become_constraints() {
        assert_eq!(constraint(None).unwrap(), None);
        assert_eq!(
            constraint(Some(&rf(serde_json::json!({"type": "text"})))).unwrap(),
            None
        );
        let o = constraint(Some(&rf(serde_json::json!({"type": "json_object"})))).unwrap();
        assert_eq!(o.unwrap().kind, Some(Kind::JsonObject(true)));
        let s = constraint(Some(&rf(serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": "x", "strict": true, "schema": {"type": "integer"}}
        }))))
        .unwrap();
        assert_eq!(
            s.unwrap().kind,
            Some(Kind::JsonSchema(r#"{"type":"integer"}"#.into()))
        );
        let e = constraint(Some(&rf(serde_json::json!({"type": "yaml"})))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("response_format"));
        assert!(constraint(Some(&rf(serde_json::json!({"type": "json_schema"})))).is_err());
    }

    #[test]
    fn fields_that_change_the_output_are_refused_by_name() {
        let extra = |v: Value| v.as_object().unwrap().clone();
        assert!(refuse_unknown(&extra(serde_json::json!({
            "user": "u", "metadata": {"a": 1}, "presence_penalty": 0, "logit_bias": {}
        })))
        .is_ok());
        for (field, value) in [
            ("tools", serde_json::json!([{"type": "function"}])),
            ("tool_choice", serde_json::json!("required")),
            ("presence_penalty", serde_json::json!(0.5)),
            ("logit_bias", serde_json::json!({"50256": -100})),
            ("best_of", serde_json::json!(3)),
            ("frobnicate", serde_json::json!(true)),
        ] {
            let e = refuse_unknown(&extra(serde_json::json!({ field: value }))).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{field}");
            assert!(e.message.contains(field), "{}", e.message);
        }
    }
}
