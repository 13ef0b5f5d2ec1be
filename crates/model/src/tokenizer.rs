//! Text <-> token ids: a `tokenizers` tokenizer plus the model's special tokens and chat template,
//! built from a Hugging Face `tokenizer.json` or from GGUF metadata. [`TextStream`] turns a token
//! stream into text pieces without splitting multi-byte characters.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::chat::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::source::gguf::GgufTokenizer;

/// Llama-3's pre-tokenizer split pattern (llama.cpp `llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// Whether prompts start with BOS (`add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (and the chat template of `tokenizer_config.json`, if present).
    pub fn from_hf_dir(dir: &Path, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        // tokenizers panics on some malformed files (an `expect` in its decoder's Deserialize,
        // found by fuzzing): a bad file must be an error naming it, not a crash.
        let loaded = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&path));
        let inner = match loaded {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("malformed (the tokenizers library panicked reading it)".to_string()),
        }
        .map_err(|message| ModelError::Tokenizer {
            path: path.clone(),
            message,
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let mut chat_template = None;
        let mut add_bos = false;
        if config_path.exists() {
            let json: serde_json::Value = crate::json::read(&config_path, "JSON")?;
            if let Some(t) = json.get("chat_template").and_then(|t| t.as_str()) {
                chat_template = Some(ChatTemplate::new(t)?);
            }
            add_bos = json
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        }
        Ok(Self {
            inner,
            source: path,
            bos,
            eos,
            add_bos,
            chat_template,
        })
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata.
    pub fn from_gguf(path: &Path, parts: GgufTokenizer) -> Result<Self> {
        let err = |message: String| ModelError::Tokenizer {
            path: path.into(),
            message,
        };
        let vocab: tokenizers::models::bpe::Vocab = parts
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, parts.merges)
            .build()
            .map_err(|e| err(format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match parts.pre.as_str() {
            "default" | "gpt2" | "gpt-2" => byte_level.into(),
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "llama-bpe" | "llama3" | "llama-v3" => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_PATTERN.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
            other => {
                return Err(err(format!(
                    "metadata `tokenizer.ggml.pre`: pre-tokenizer `{other}` is not supported \
                     (supported: gpt2, smollm, starcoder, refact, llama-bpe)"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are never split by the BPE.
        let specials: Vec<AddedToken> = parts
            .tokens
            .iter()
            .zip(parts.token_types.iter())
            .filter(|(_, t)| matches!(**t, 3 | 4))
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| err(format!("special tokens: {e}")))?;
        let chat_template = parts
            .chat_template
            .as_deref()
            .map(ChatTemplate::new)
            .transpose()?;
        Ok(Self {
            inner,
            source: path.into(),
            bos: parts.bos,
            eos: parts.eos.into_iter().collect(),
            add_bos: parts.add_bos,
            chat_template,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (chat template, BOS/EOS) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                message: format!("cannot write: {e}"),
            })?;
        let name = |id: Option<u32>| id.and_then(|i| self.token_to_str(i));
        let config = serde_json::json!({
            "add_bos_token": self.add_bos,
            "bos_token": name(self.bos),
            "eos_token": name(self.eos.first().copied()),
            "chat_template": self.chat_template.as_ref().map(|t| t.source()),
        });
        crate::json::write(&dir.join("tokenizer_config.json"), &config)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, with BOS first when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let plain = self.encode_plain(text)?;
        if !self.add_bos || self.bos.is_none() {
            return Ok(plain);
        }
        let mut ids = Vec::with_capacity(plain.len() + 1);
        ids.extend(self.bos);
        ids.extend(plain);
        Ok(ids)
    }

    /// Token ids of `text` alone (no BOS): how a piece of output tokenizes.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                message: format!("encode: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The tokenizer in Hugging Face's `tokenizer.json` form (constrained decoding reads each
    /// token's bytes from it).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                message: format!("serialize: {e}"),
            })
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                message: format!("decode: {e}"),
            })
    }

    pub fn token_to_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Renders a one-turn chat prompt with the model's template.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat_conversation(&[("user", user)])
    }

    /// Renders `(role, content)` messages with the model's template, followed by the assistant's
    /// generation prompt.
    pub fn chat_conversation(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!(
                "{}: the model has no chat template",
                self.source.display()
            ))
        })?;
        let bos = self
            .bos
            .and_then(|id| self.token_to_str(id))
            .unwrap_or_default();
        let eos = self
            .eos
            .first()
            .and_then(|&id| self.token_to_str(id))
            .unwrap_or_default();
        template.render(messages, &bos, &eos)
    }
}

/// Incremental detokenizer: feed ids one at a time, get the text they complete. Holds back bytes
/// of an unfinished UTF-8 character (the same offsets scheme as text-generation-inference).
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the new text, if any is complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}
