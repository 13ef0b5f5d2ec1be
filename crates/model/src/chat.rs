//! Chat templates: the model's Jinja template (from `tokenizer_config.json` or GGUF metadata)
//! rendered with minijinja and its Python-compatibility methods, as Hugging Face does.

use minijinja::{context, Environment, Error, ErrorKind};

use crate::error::{ModelError, Result};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("cannot parse: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    /// The template text (saved with converted models).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `(role, content)` messages followed by the assistant's generation prompt.
    pub fn render(&self, messages: &[(&str, &str)], bos: &str, eos: &str) -> Result<String> {
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| context! { role => role, content => content })
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos,
                eos_token => eos,
            })
            .map_err(|e| ModelError::ChatTemplate(format!("cannot render: {e}")))
    }
}
