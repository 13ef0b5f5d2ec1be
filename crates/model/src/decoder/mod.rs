//! The Llama-family decoder: embeddings, pre-norm layers (RMSNorm, RoPE grouped-query attention,
//! SwiGLU MLP), final norm and LM head; optionally recursive (K shared layers looped N/K times,
//! each unrolled layer with its own LoRA and norms, see [`crate::recursive`]).
//!
//! The forward works on a *flattened batch*: the new tokens of several independent sequences,
//! each with its own position and [`SeqCache`], are stacked into one `[rows, hidden]` matrix so
//! every projection is one matmul for all of them; only attention is per sequence. The layer-level
//! pieces ([`Llama::embed`], [`Llama::layer_forward`], [`Llama::logits`]) are public because the
//! depth-wise engine schedules rows of different sequences *and different loop depths* through
//! the shared layers itself: [`RowGroup`]s say which rows are at which unrolled layer.

mod load;

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::attention::{append_kv, attention, prefetch_kv, AttnDims, AttnSegment};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kernels::swiglu;
use crate::kv::{KvDtype, KvLayout, KvPool, SeqCache, DEFAULT_BLOCK_TOKENS};
use crate::linear::{with_f32_slice, Linear};
use crate::projection::Fused;
use crate::recursive::exit_heads::ExitHeads;
use crate::recursive::lora::{add_fused, LayerLora};
use crate::recursive::Recursion;
use crate::rope::Rope;

/// The most bytes of KV cache (all segments of one layer call together) prefetched during the
/// Q|K|V matmul: a quarter of a Zen 4 CCD's 32 MiB L3, where what overflows the core's L2 lands
/// (SmolLM2: 32 sequences of ~500 positions, or batch 1 up to ~5,000). Against 512 KiB (one
/// call of batch 1 or 4 short sequences), 3 alternating runs of `rrt bench decode` at batch 32
/// (KV ~4.7 MiB a layer call): q8 654-749 -> 789-803 tokens/s, f32 -0.5% to +7%; batch 8
/// -1% to +7%.
const KV_PREFETCH_MAX: usize = 8 << 20;

/// Weights of one (shared) decoder layer. Q, K, V are fused into one projection, gate and up
/// into another.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub qkv: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate_up: Linear,
    pub down: Linear,
}

/// Which logits a batch item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (e.g. a prefill chunk that is not the last).
    None,
    /// The last new token's (generation).
    Last,
    /// Every new token's (scoring, perplexity).
    All,
}

/// One sequence's part of a batch: its new tokens, where they start, and its cache.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions from here on are written again (so a caller can roll
    /// back), so it may not be beyond what the cache holds.
    pub offset: usize,
    pub cache: &'a mut SeqCache,
    pub logits: Logits,
}

/// Rows of a batch that sit at the same unrolled layer (same LoRA, same norms).
#[derive(Debug, Clone)]
pub struct RowGroup {
    pub rows: Range<usize>,
    pub unrolled: usize,
}

/// K/V-only rows riding along a [`Llama::layer_forward_filling`] call: hidden states `h`
/// (`[rows, hidden]`, row indices of `groups` and `segments` relative to it) whose K and V go
/// into the segments' caches at the groups' unrolled layers.
pub struct FillRows<'a, 's, 'c> {
    pub h: &'a Tensor,
    pub groups: &'a [RowGroup],
    pub segments: &'s [AttnSegment<'c>],
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct Llama {
    /// `num_layers` is the unrolled depth N.
    pub cfg: ModelConfig,
    pub embed: Tensor,
    /// The distinct layers: N for a plain model, K shared ones for a recursive model.
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub rope: Rope,
    pub recursion: Option<Recursion>,
    /// Learned exit heads (adapters and classifiers), when trained for this model.
    pub exit_heads: Option<ExitHeads>,
}

impl Llama {
    pub fn from_parts(
        cfg: ModelConfig,
        embed: Tensor,
        layers: Vec<LayerWeights>,
        norm: Tensor,
        lm_head: Linear,
        recursion: Option<Recursion>,
    ) -> Self {
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings);
        Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            recursion,
            exit_heads: None,
        }
    }

    /// A fresh, empty cache for one sequence (a block table: its blocks come from the pool the
    /// forward is given).
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::default()
    }

    /// The shape of this model's KV blocks: every unrolled layer, `block_tokens` positions, K
    /// and V as `dtype`.
    pub fn kv_layout(&self, block_tokens: usize, dtype: KvDtype) -> Result<KvLayout> {
        KvLayout::new(self.cfg.num_layers, self.cfg.kv_dim(), block_tokens, dtype)?
            .with_scale_group(self.cfg.head_dim)
    }

    /// A growable f32 KV pool for this model (one-sequence generation, scoring, tests).
    pub fn new_kv_pool(&self) -> KvPool {
        KvPool::growable(
            self.kv_layout(DEFAULT_BLOCK_TOKENS, KvDtype::F32)
                .expect("the default block size is a multiple of the K tile"),
        )
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Unrolled layers per loop (K; N for a plain model).
    pub fn block_layers(&self) -> usize {
        self.layers.len()
    }

    /// Loops over the shared block (1 for a plain model).
    pub fn loops(&self) -> usize {
        self.cfg.num_layers / self.layers.len().max(1)
    }

    fn dims(&self) -> AttnDims {
        AttnDims {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn lora(&self, unrolled: usize) -> Option<&LayerLora> {
        self.recursion
            .as_ref()
            .map(|r| &r.lora[unrolled])
            .filter(|l| !l.is_empty())
    }

    /// The (attention, MLP) norm weights unrolled layer `l` uses.
    fn norms(&self, l: usize) -> (&Tensor, &Tensor) {
        match self.recursion.as_ref().and_then(|r| r.loop_norms.get(l)) {
            Some(n) => (&n.attn, &n.mlp),
            None => {
                let shared = &self.layers[l % self.layers.len()];
                (&shared.attn_norm, &shared.mlp_norm)
            }
        }
    }

    /// Embeddings of `tokens`, `[rows, hidden]` f32.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let ids = Tensor::new(tokens, self.device())?;
        Ok(self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?)
    }

    /// RMSNorm of each group's rows with its unrolled layer's weight (`mlp`: the second norm).
    fn norm_groups(&self, x: &Tensor, groups: &[RowGroup], mlp: bool) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let weight = |l: usize| {
            if mlp {
                self.norms(l).1
            } else {
                self.norms(l).0
            }
        };
        let first = weight(groups[0].unrolled);
        if groups
            .iter()
            .all(|g| std::ptr::eq(weight(g.unrolled), first))
        {
            return Ok(candle_nn::ops::rms_norm(x, first, eps)?);
        }
        let parts = groups
            .iter()
            .map(|g| {
                candle_nn::ops::rms_norm(
                    &x.narrow(0, g.rows.start, g.rows.len())?,
                    weight(g.unrolled),
                    eps,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The shared layer's fused weight `f` over all rows, plus each group's LoRA deltas.
    fn project(
        &self,
        layer: &LayerWeights,
        f: Fused,
        x: &Tensor,
        groups: &[RowGroup],
    ) -> Result<Vec<f32>> {
        let rows = x.dim(0)?;
        let linear = layer.linear(f);
        let k = linear.in_dim();
        with_f32_slice(x, |xs| -> Result<Vec<f32>> {
            let mut y = linear.forward_slice(xs, rows)?;
            for g in groups {
                if let Some(lora) = self.lora(g.unrolled) {
                    let xg = &xs[g.rows.start * k..g.rows.end * k];
                    add_fused(&mut y, g.rows.start, xg, lora, f, &self.cfg)?;
                }
            }
            Ok(y)
        })?
    }

    /// The shared layer every group runs (they must agree).
    fn shared_layer(&self, groups: &[RowGroup]) -> Result<&LayerWeights> {
        let k = self.layers.len();
        let shared_index = groups.first().map(|g| g.unrolled % k).unwrap_or(0);
        if groups
            .iter()
            .any(|g| g.unrolled % k != shared_index || g.unrolled >= self.cfg.num_layers)
        {
            return Err(ModelError::InvalidInput(
                "row groups of one layer call must run the same shared layer".into(),
            ));
        }
        Ok(&self.layers[shared_index])
    }

    /// Writes K and V of hidden states `h` (`[rows, hidden]`) into the caches of `segments` at
    /// the groups' unrolled layers, without running attention or the MLP: state propagation
    /// for a token that exited before those layers (CALM), so later tokens can attend to it.
    pub fn fill_kv(
        &self,
        h: &Tensor,
        groups: &[RowGroup],
        kv: &mut KvPool,
        segments: &[AttnSegment<'_>],
    ) -> Result<()> {
        let layer = self.shared_layer(groups)?;
        let hn = self.norm_groups(h, groups, false)?;
        let mut qkv = self.qkv(layer, &hn, groups)?;
        append_kv(kv, &mut qkv, segments, self.dims(), &self.rope)
    }

    /// The fused Q|K|V projection (with each group's LoRA) of normed rows `hn`.
    fn qkv(&self, layer: &LayerWeights, hn: &Tensor, groups: &[RowGroup]) -> Result<Vec<f32>> {
        self.project(layer, Fused::Qkv, hn, groups)
    }

    /// [`Llama::qkv`] while this thread asks for the segments' K and V of this layer (when they
    /// are small: [`KV_PREFETCH_MAX`]), so attention, next, reads them from cache. Between two
    /// visits of a layer a decode step streams every weight through the caches, so each
    /// attention used to wait on memory a line at a time; now the fetch overlaps the Q|K|V
    /// matmul, which the other core starts meanwhile (measured with a timer in the decode
    /// bench, bf16, batch 1, context ~80: attention 0.48-0.51 -> 0.28-0.30 ms a step).
    fn qkv_prefetching_kv(
        &self,
        layer: &LayerWeights,
        hn: &Tensor,
        groups: &[RowGroup],
        kv: &KvPool,
        segments: &[AttnSegment<'_>],
    ) -> Result<Vec<f32>> {
        let positions: usize = segments.iter().map(|s| s.start).sum();
        let bytes = positions * kv.layout().bytes_per_token() / self.cfg.num_layers;
        if bytes == 0 || bytes > KV_PREFETCH_MAX {
            return self.qkv(layer, hn, groups);
        }
        rayon::join(|| prefetch_kv(kv, segments), || self.qkv(layer, hn, groups)).1
    }

    /// One decoder layer over a flattened batch `x [rows, hidden]`. `groups` cover the rows in
    /// order and must all run the same shared layer; `segments` say which rows belong to which
    /// sequence and hold that sequence's cache for the group's unrolled layer.
    pub fn layer_forward(
        &self,
        groups: &[RowGroup],
        x: &Tensor,
        kv: &mut KvPool,
        segments: &[AttnSegment<'_>],
    ) -> Result<Tensor> {
        self.layer_forward_filling(groups, x, kv, segments, None)
    }

    /// [`Llama::layer_forward`] that also writes K/V for `fill` rows (what [`Llama::fill_kv`]
    /// does) in the same Q|K|V matmul as the batch, so state propagation for early-exited
    /// tokens costs rows of a matmul that streams the weights anyway, not a pass of its own.
    /// Fill groups must run the same shared layer as `groups`.
    pub fn layer_forward_filling(
        &self,
        groups: &[RowGroup],
        x: &Tensor,
        kv: &mut KvPool,
        segments: &[AttnSegment<'_>],
        fill: Option<FillRows<'_, '_, '_>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let rows = x.dim(0)?;
        let (qd, f, h) = (cfg.q_dim(), cfg.intermediate_size, cfg.hidden_size);
        let width = qd + 2 * cfg.kv_dim();

        let hn = self.norm_groups(x, groups, false)?;
        let (layer, mut qkv, fill) = match fill {
            None => {
                let layer = self.shared_layer(groups)?;
                let qkv = self.qkv_prefetching_kv(layer, &hn, groups, kv, segments)?;
                (layer, qkv, None)
            }
            Some(fill) => {
                let mut all = groups.to_vec();
                all.extend(fill.groups.iter().map(|g| RowGroup {
                    rows: g.rows.start + rows..g.rows.end + rows,
                    unrolled: g.unrolled,
                }));
                let layer = self.shared_layer(&all)?;
                let hf = self.norm_groups(fill.h, fill.groups, false)?;
                let both = Tensor::cat(&[&hn, &hf], 0)?;
                let mut qkv = self.qkv_prefetching_kv(layer, &both, &all, kv, segments)?;
                let fill_qkv = qkv.split_off(rows * width);
                (layer, qkv, Some((fill_qkv, fill.segments)))
            }
        };
        if let Some((mut fill_qkv, fill_segments)) = fill {
            append_kv(kv, &mut fill_qkv, fill_segments, self.dims(), &self.rope)?;
        }
        let attn = attention(kv, &mut qkv, segments, self.dims(), &self.rope)?;
        let attn = Tensor::from_vec(attn, (rows, qd), x.device())?;
        let o = self.project(layer, Fused::O, &attn, groups)?;
        let x = (x + Tensor::from_vec(o, (rows, h), x.device())?)?;

        let hn = self.norm_groups(&x, groups, true)?;
        let gu = self.project(layer, Fused::GateUp, &hn, groups)?;
        let dev = x.device().clone();
        let act = Tensor::from_vec(swiglu(&gu, f), (rows, f), &dev)?;
        let down = self.project(layer, Fused::Down, &act, groups)?;
        Ok((x + Tensor::from_vec(down, (rows, h), &dev)?)?)
    }

    /// Hidden states `[rows, hidden]` that exit after `loops_done` loops, made ready for the
    /// shared final norm and LM head: through that loop's exit adapter when the model has one
    /// (an early exit), unchanged otherwise.
    pub fn exit_input(&self, loops_done: usize, hidden: &Tensor) -> Result<Tensor> {
        match &self.exit_heads {
            Some(e) if loops_done >= 1 && loops_done < self.loops() => {
                match e.heads.get(loops_done - 1) {
                    Some(head) => head.adapt(hidden),
                    None => Ok(hidden.clone()),
                }
            }
            _ => Ok(hidden.clone()),
        }
    }

    /// The probability that a token exiting after `loops_done` loops agrees with the last loop,
    /// from its hidden state (`None` without a learned exit head for that loop).
    pub fn exit_probability(&self, loops_done: usize, hidden: &[f32]) -> Option<f32> {
        let head = self
            .exit_heads
            .as_ref()?
            .heads
            .get(loops_done.checked_sub(1)?)?;
        Some(head.exit_probability(hidden, self.cfg.rms_norm_eps as f32))
    }

    /// Final norm and LM head over hidden states `[rows, hidden]` -> logits `[rows, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Checks a batch (and that `kv` is this model's) before any cache is touched.
    fn validate(&self, kv: &KvPool, items: &[BatchItem<'_>]) -> Result<()> {
        let layout = kv.layout();
        if layout.layers != self.cfg.num_layers || layout.row != self.cfg.kv_dim() {
            return Err(ModelError::InvalidInput(format!(
                "a KV pool of {} layers x {} floats a position, the model needs {} x {}",
                layout.layers,
                layout.row,
                self.cfg.num_layers,
                self.cfg.kv_dim()
            )));
        }
        for (i, item) in items.iter().enumerate() {
            if item.tokens.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "batch item {i} has no tokens"
                )));
            }
            if item.offset > item.cache.len() {
                return Err(ModelError::InvalidInput(format!(
                    "batch item {i} starts at position {} but its cache holds only {}",
                    item.offset,
                    item.cache.len()
                )));
            }
            let end = item.offset + item.tokens.len();
            if end > self.rope.max_positions() {
                return Err(ModelError::InvalidInput(format!(
                    "batch item {i} reaches position {end}, beyond the context of {}",
                    self.rope.max_positions()
                )));
            }
        }
        Ok(())
    }

    /// Runs the batch through every layer and returns the requested logits, stacked in item
    /// order (`Last` gives one row, `All` one row per new token, `None` none). Each item's
    /// table takes the blocks it needs from `kv`.
    pub fn forward(&self, kv: &mut KvPool, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        let mut out = self.forward_loops(kv, items, false)?;
        Ok(out.pop().expect("forward_loops returns the last loop"))
    }

    /// Like [`Llama::forward`], but with `every_loop` it also returns the logits an exit head
    /// (final norm + LM head) reads after each loop: one tensor per loop, the last is the
    /// model's output. Without it, only the last.
    pub fn forward_loops(
        &self,
        kv: &mut KvPool,
        items: &mut [BatchItem<'_>],
        every_loop: bool,
    ) -> Result<Vec<Tensor>> {
        self.validate(kv, items)?;
        for it in items.iter_mut() {
            kv.reserve(it.cache, it.offset + it.tokens.len())?;
        }
        let tokens: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let rows = tokens.len();
        let mut x = self.embed(&tokens)?;
        let keep = Self::kept_rows(items);
        let block = self.block_layers();
        let mut out = Vec::new();
        for l in 0..self.cfg.num_layers {
            let mut row = 0;
            let segments: Vec<AttnSegment<'_>> = items
                .iter()
                .map(|it| {
                    let seg = AttnSegment {
                        rows: row..row + it.tokens.len(),
                        start: it.offset,
                        cache: &*it.cache,
                        layer: l,
                    };
                    row += it.tokens.len();
                    seg
                })
                .collect();
            x = self.layer_forward(
                &[RowGroup {
                    rows: 0..rows,
                    unrolled: l,
                }],
                &x,
                kv,
                &segments,
            )?;
            let last = l + 1 == self.cfg.num_layers;
            if last || (every_loop && (l + 1) % block == 0) {
                out.push(self.select_logits(&x, &keep)?);
            }
        }
        for it in items.iter_mut() {
            it.cache.set_len(it.offset + it.tokens.len());
        }
        Ok(out)
    }

    fn kept_rows(items: &[BatchItem<'_>]) -> Vec<u32> {
        let mut keep = Vec::new();
        let mut row = 0u32;
        for it in items {
            let n = it.tokens.len() as u32;
            match it.logits {
                Logits::None => {}
                Logits::Last => keep.push(row + n - 1),
                Logits::All => keep.extend(row..row + n),
            }
            row += n;
        }
        keep
    }

    fn select_logits(&self, x: &Tensor, keep: &[u32]) -> Result<Tensor> {
        if keep.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                self.device(),
            )?);
        }
        let keep = Tensor::new(keep, self.device())?;
        self.logits(&x.index_select(&keep, 0)?)
    }

    /// Holds the projections and the LM head as `dtype` from now on (repacked from their
    /// current values; a model built in f32, e.g. just converted, then runs like one loaded at
    /// `dtype`). Embeddings follow as at load; LoRA, norms and exit heads stay as they are.
    pub fn set_weight_dtype(
        &mut self,
        dtype: crate::dtype::WeightDtype,
    ) -> candle_core::Result<()> {
        let repack = |l: &mut crate::linear::Linear| -> candle_core::Result<()> {
            if l.dtype() != dtype {
                *l = crate::linear::Linear::with_dtype(l.weight()?, dtype)?;
            }
            Ok(())
        };
        for layer in &mut self.layers {
            for l in [
                &mut layer.qkv,
                &mut layer.o,
                &mut layer.gate_up,
                &mut layer.down,
            ] {
                repack(l)?;
            }
        }
        repack(&mut self.lm_head)?;
        self.embed = self.embed.to_dtype(dtype.embed_dtype())?;
        Ok(())
    }

    /// Bytes of weights held in memory (a tied LM head is packed separately from the embedding).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = t(&self.embed) + t(&self.norm) + self.lm_head.bytes();
        for l in &self.layers {
            total += t(&l.attn_norm) + t(&l.mlp_norm);
            total += [&l.qkv, &l.o, &l.gate_up, &l.down]
                .iter()
                .map(|x| x.bytes())
                .sum::<usize>();
        }
        if let Some(r) = &self.recursion {
            for lora in &r.lora {
                total += lora
                    .proj
                    .iter()
                    .flatten()
                    .map(|p| p.a.bytes() + p.b.bytes())
                    .sum::<usize>();
            }
            total += r
                .loop_norms
                .iter()
                .map(|n| t(&n.attn) + t(&n.mlp))
                .sum::<usize>();
        }
        total
    }

    /// Non-embedding parameters held (the paper's convention): the distinct layers, the final
    /// norm, and for a recursive model its LoRA and per-loop norms.
    pub fn non_embedding_params(&self) -> usize {
        let cfg = &self.cfg;
        let mut n = self.layers.len() * cfg.layer_params() + cfg.hidden_size;
        if let Some(r) = &self.recursion {
            n += r.lora_params() + r.loop_norm_params();
        }
        n
    }
}
