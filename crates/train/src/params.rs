//! The model being trained as a flat list of named tensors ([`Params`]), each trainable or
//! frozen, and the structure that says which tensor plays which part ([`TrainModel`]): the
//! embedding (tied LM head), the final norm, the K shared layers' fused weights, and per
//! unrolled layer its LoRA pairs and norms. Built from, and turned back into, an
//! [`rrt_model::Llama`], so the trainer reads and writes the directories every command loads.

use candle_core::{Device, Tensor};
use rrt_model::recursive::lora::{LayerLora, ProjLora};
use rrt_model::recursive::{LoopNorms, Recursion};
use rrt_model::rope::Rope;
use rrt_model::{Fused, LayerWeights, Llama, ModelConfig, Projection};

use crate::error::{Result, TrainError};

/// The index of a tensor in [`Params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id(pub usize);

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    pub trainable: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Params {
    pub list: Vec<Param>,
}

impl Params {
    pub fn add(&mut self, name: String, shape: Vec<usize>, value: Vec<f32>) -> Id {
        debug_assert_eq!(shape.iter().product::<usize>(), value.len());
        self.list.push(Param {
            name,
            shape,
            value,
            trainable: false,
        });
        Id(self.list.len() - 1)
    }

    pub fn get(&self, id: Id) -> &[f32] {
        &self.list[id.0].value
    }

    pub fn trainable(&self, id: Id) -> bool {
        self.list[id.0].trainable
    }

    /// Trainable parameters (elements).
    pub fn trainable_count(&self) -> usize {
        self.list
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.value.len())
            .sum()
    }
}

/// Gradients, laid out like [`Params`]: a zero buffer per trainable tensor, nothing for frozen
/// ones.
#[derive(Debug, Clone)]
pub struct Grads(pub Vec<Vec<f32>>);

impl Grads {
    pub fn zeros(params: &Params) -> Self {
        Grads(
            params
                .list
                .iter()
                .map(|p| {
                    if p.trainable {
                        vec![0f32; p.value.len()]
                    } else {
                        Vec::new()
                    }
                })
                .collect(),
        )
    }

    /// The gradient buffer of `id`, or `None` when it is frozen.
    pub fn get_mut(&mut self, id: Id) -> Option<&mut [f32]> {
        let g = &mut self.0[id.0];
        (!g.is_empty()).then_some(g.as_mut_slice())
    }

    pub fn clear(&mut self) {
        for g in &mut self.0 {
            g.fill(0.0);
        }
    }
}

/// One projection's LoRA pair: `A` is `[rank, in]`, `B` is `[out, rank]`.
#[derive(Debug, Clone, Copy)]
pub struct LoraIds {
    pub a: Id,
    pub b: Id,
    pub rank: usize,
}

/// A shared layer's fused weights (row-major `[out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct SharedIds {
    pub fused: [Id; 4],
    /// The layer's own (attention, MLP) norms; unrolled layers with norms of their own use
    /// those instead.
    pub norms: (Id, Id),
}

impl SharedIds {
    pub fn weight(&self, f: Fused) -> Id {
        self.fused[f as usize]
    }
}

/// What unrolled layer `l` runs.
#[derive(Debug, Clone)]
pub struct Unrolled {
    /// The shared layer (`l mod K`).
    pub shared: usize,
    /// Per projection (indexed by [`Projection::index`]).
    pub lora: [Option<LoraIds>; 7],
    pub attn_norm: Id,
    pub mlp_norm: Id,
}

/// A loop's learned exit head: adapter `V` (`[rank, h]`) and `U` (`[h, rank]`), classifier
/// weight (`[h]`) and bias (`[1]`).
#[derive(Debug, Clone, Copy)]
pub struct ExitIds {
    pub down: Id,
    pub up: Id,
    pub classifier: Id,
    pub bias: Id,
    pub rank: usize,
}

/// Which parameter groups train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Groups {
    pub shared: bool,
    pub lora: bool,
    pub norms: bool,
    /// The exit adapters and classifiers.
    pub exits: bool,
}

/// The model in training form.
#[derive(Debug, Clone)]
pub struct TrainModel {
    pub cfg: ModelConfig,
    pub params: Params,
    /// `[vocab, hidden]`; also the LM head (tied).
    pub embed: Id,
    /// `[vocab, hidden]` when the head is not tied to the embedding.
    pub head: Option<Id>,
    pub final_norm: Id,
    pub shared: Vec<SharedIds>,
    pub unrolled: Vec<Unrolled>,
    pub rope: Rope,
    /// The recursion the model came with (`None`: a plain model, every layer its own).
    pub recursion: Option<rrt_model::recursive::RecursiveMeta>,
    /// Learned exit heads, per loop but the last (empty: none).
    pub exits: Vec<ExitIds>,
    /// The precision of the matrix products (the values stay f32).
    pub precision: crate::Precision,
    /// The frozen LM head packed for bf16 products, both ways (built on first use; see
    /// [`crate::precision::packed_head`]).
    pub packed_head: std::sync::OnceLock<crate::precision::PackedHead>,
    /// Shared weights packed for bf16 products this optimizer step.
    pub packs: crate::precision::PackCache,
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl TrainModel {
    /// Takes the weights of `model` (a recursive model, or a plain one as N x 1).
    pub fn from_llama(model: &Llama) -> Result<Self> {
        let cfg = model.cfg.clone();
        let mut params = Params::default();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = params.add(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            values(&model.embed)?,
        );
        let head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(params.add(
                "lm_head.weight".into(),
                vec![v, h],
                values(&model.lm_head.weight()?)?,
            ))
        };
        let final_norm = params.add("model.norm.weight".into(), vec![h], values(&model.norm)?);
        let mut shared = Vec::new();
        let mut shared_norms = Vec::new();
        for (k, layer) in model.layers.iter().enumerate() {
            let fused = Fused::ALL.map(|f| {
                let w = values(&layer.linear(f).weight()?)?;
                let name = format!("model.layers.{k}.{f:?}");
                Ok::<_, TrainError>(params.add(name, vec![f.out_dim(&cfg), f.in_dim(&cfg)], w))
            });
            let [a, b, c, d] = fused;
            let attn = params.add(
                format!("model.layers.{k}.input_layernorm.weight"),
                vec![h],
                values(&layer.attn_norm)?,
            );
            let mlp = params.add(
                format!("model.layers.{k}.post_attention_layernorm.weight"),
                vec![h],
                values(&layer.mlp_norm)?,
            );
            shared.push(SharedIds {
                fused: [a?, b?, c?, d?],
                norms: (attn, mlp),
            });
            shared_norms.push((attn, mlp));
        }
        let block = model.layers.len();
        let mut unrolled = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut lora = [None; 7];
            let (mut attn_norm, mut mlp_norm) = shared_norms[l % block];
            if let Some(r) = &model.recursion {
                for p in Projection::ALL {
                    if let Some(pl) = r.lora[l].get(p) {
                        let base = format!("rrt.lora.{l}.{}", p.path());
                        let a = params.add(
                            format!("{base}.lora_A.weight"),
                            vec![pl.rank(), p.shape(&cfg)[1]],
                            values(&pl.a.weight()?)?,
                        );
                        let b = params.add(
                            format!("{base}.lora_B.weight"),
                            vec![p.shape(&cfg)[0], pl.rank()],
                            values(&pl.b.weight()?)?,
                        );
                        lora[p.index()] = Some(LoraIds {
                            a,
                            b,
                            rank: pl.rank(),
                        });
                    }
                }
                if let Some(n) = r.loop_norms.get(l) {
                    attn_norm = params.add(
                        format!("rrt.loop_norms.{l}.input_layernorm.weight"),
                        vec![h],
                        values(&n.attn)?,
                    );
                    mlp_norm = params.add(
                        format!("rrt.loop_norms.{l}.post_attention_layernorm.weight"),
                        vec![h],
                        values(&n.mlp)?,
                    );
                }
            }
            unrolled.push(Unrolled {
                shared: l % block,
                lora,
                attn_norm,
                mlp_norm,
            });
        }
        Self {
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings),
            cfg,
            params,
            embed,
            head,
            final_norm,
            shared,
            unrolled,
            recursion: model.recursion.as_ref().map(|r| r.meta.clone()),
            exits: Vec::new(),
            precision: crate::Precision::F32,
            packed_head: std::sync::OnceLock::new(),
            packs: Default::default(),
        }
        .with_exit_heads_of(model)
    }

    /// Takes the exit heads `model` has, if any.
    fn with_exit_heads_of(mut self, model: &Llama) -> Result<Self> {
        let Some(e) = &model.exit_heads else {
            return Ok(self);
        };
        let h = self.cfg.hidden_size;
        let rank = e.meta.adapter_rank;
        if rank == 0 {
            return Err(TrainError::Input(
                "exit heads without adapters cannot be trained here".into(),
            ));
        }
        for (j, head) in e.heads.iter().enumerate() {
            let [down, up, w, b] = rrt_model::recursive::exit_heads::names(j);
            let (d, u) = head
                .adapter
                .as_ref()
                .ok_or_else(|| TrainError::Input(format!("exit head {j} has no adapter")))?;
            let ids = ExitIds {
                down: self.params.add(down, vec![rank, h], values(&d.weight()?)?),
                up: self.params.add(up, vec![h, rank], values(&u.weight()?)?),
                classifier: self.params.add(w, vec![h], head.classifier.clone()),
                bias: self.params.add(b, vec![1], vec![head.bias]),
                rank,
            };
            self.exits.push(ids);
        }
        Ok(self)
    }

    /// Gives every loop but the last a fresh exit head: the adapter starts as the identity
    /// (`U = 0`, `V` small and seeded), the classifier at probability 1/2.
    pub fn add_exit_heads(&mut self, rank: usize, seed: u64) {
        let h = self.cfg.hidden_size;
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut noise = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        self.exits = (0..self.loops().saturating_sub(1))
            .map(|j| {
                let [down, up, w, b] = rrt_model::recursive::exit_heads::names(j);
                ExitIds {
                    down: self.params.add(
                        down,
                        vec![rank, h],
                        noise(rank * h, 2.0 / (h as f32).sqrt()),
                    ),
                    up: self.params.add(up, vec![h, rank], vec![0.0; h * rank]),
                    classifier: self.params.add(w, vec![h], vec![0.0; h]),
                    bias: self.params.add(b, vec![1], vec![0.0]),
                    rank,
                }
            })
            .collect();
    }

    /// Whether any tensor of the decoder layers trains (else the backward pass stops at the
    /// exit heads).
    pub fn layers_train(&self) -> bool {
        self.shared
            .iter()
            .any(|s| s.fused.iter().any(|&id| self.params.trainable(id)))
            || self.unrolled.iter().any(|u| {
                self.params.trainable(u.attn_norm)
                    || self.params.trainable(u.mlp_norm)
                    || u.lora.iter().flatten().any(|l| self.params.trainable(l.a))
            })
    }

    /// The exit heads in inference form (`None` without any).
    pub fn to_exit_heads(
        &self,
        trained: String,
    ) -> Result<Option<rrt_model::recursive::exit_heads::ExitHeads>> {
        use rrt_model::recursive::exit_heads::{ExitHead, ExitHeads, ExitHeadsMeta};
        let Some(rank) = self.exits.first().map(|e| e.rank) else {
            return Ok(None);
        };
        let dev = Device::Cpu;
        let t = |id: Id| -> Result<Tensor> {
            let p = &self.params.list[id.0];
            Ok(Tensor::from_slice(&p.value, p.shape.as_slice(), &dev)?)
        };
        let heads = self
            .exits
            .iter()
            .map(|e| {
                Ok(ExitHead {
                    adapter: Some((
                        rrt_model::linear::Linear::new(t(e.down)?)?,
                        rrt_model::linear::Linear::new(t(e.up)?)?,
                    )),
                    classifier: self.params.get(e.classifier).to_vec(),
                    bias: self.params.get(e.bias)[0],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = ExitHeadsMeta {
            adapter_rank: rank,
            loops: heads.len(),
            trained,
            curves: Vec::new(),
            cascade: Vec::new(),
        };
        Ok(Some(ExitHeads { meta, heads }))
    }

    /// Shared layers (K).
    pub fn block(&self) -> usize {
        self.shared.len()
    }

    /// Loops over the block.
    pub fn loops(&self) -> usize {
        self.unrolled.len() / self.block().max(1)
    }

    /// The LM head's weight.
    pub fn head(&self) -> Id {
        self.head.unwrap_or(self.embed)
    }

    /// Marks the tensors of `groups` trainable (the rest frozen); errors if a group asked for
    /// has no tensor (e.g. LoRA on a model without any).
    pub fn set_trainable(&mut self, groups: Groups) -> Result<()> {
        for p in &mut self.params.list {
            p.trainable = false;
        }
        let mut ids = Vec::new();
        if groups.shared {
            ids.extend(self.shared.iter().flat_map(|s| s.fused));
        }
        if groups.lora {
            let lora: Vec<Id> = self
                .unrolled
                .iter()
                .flat_map(|u| u.lora.iter().flatten().flat_map(|l| [l.a, l.b]))
                .collect();
            if lora.is_empty() {
                return Err(TrainError::Input(
                    "--train lora: the model has no LoRA (convert it with --lora-rank > 0, or train `all`)".into(),
                ));
            }
            ids.extend(lora);
        }
        if groups.norms {
            ids.push(self.final_norm);
            ids.extend(self.unrolled.iter().flat_map(|u| [u.attn_norm, u.mlp_norm]));
        }
        if groups.exits {
            if self.exits.is_empty() {
                return Err(TrainError::Input(
                    "--train exit: the model has no exit heads (give --adapter-rank to add them)"
                        .into(),
                ));
            }
            ids.extend(
                self.exits
                    .iter()
                    .flat_map(|e| [e.down, e.up, e.classifier, e.bias]),
            );
        }
        for id in ids {
            self.params.list[id.0].trainable = true;
        }
        Ok(())
    }

    /// The model back in inference form (same recursion metadata).
    pub fn to_llama(&self) -> Result<Llama> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let t = |id: Id| -> Result<Tensor> {
            let p = &self.params.list[id.0];
            Ok(Tensor::from_slice(&p.value, p.shape.as_slice(), &dev)?)
        };
        let mut layers = Vec::with_capacity(self.block());
        for s in &self.shared {
            let mut proj = Vec::with_capacity(7);
            for f in Fused::ALL {
                let w = t(s.weight(f))?;
                for p in f.parts() {
                    proj.push(w.narrow(0, p.fused_offset(cfg), p.shape(cfg)[0])?);
                }
            }
            let proj: [Tensor; 7] = proj
                .try_into()
                .map_err(|_| TrainError::Input("7 projections".into()))?;
            let (attn, mlp) = s.norms;
            layers.push(LayerWeights::from_projections(&proj, t(attn)?, t(mlp)?)?);
        }
        let head = rrt_model::linear::Linear::new(t(self.head())?)?;
        let recursion = match &self.recursion {
            None => None,
            Some(meta) => {
                let mut lora = Vec::with_capacity(self.unrolled.len());
                let mut loop_norms = Vec::new();
                for u in &self.unrolled {
                    let mut layer = LayerLora::default();
                    for p in Projection::ALL {
                        if let Some(l) = u.lora[p.index()] {
                            layer.proj[p.index()] = Some(ProjLora::new(t(l.a)?, t(l.b)?)?);
                        }
                    }
                    lora.push(layer);
                    if meta.per_loop_norms {
                        loop_norms.push(LoopNorms {
                            attn: t(u.attn_norm)?,
                            mlp: t(u.mlp_norm)?,
                        });
                    }
                }
                Some(Recursion {
                    meta: meta.clone(),
                    lora,
                    loop_norms,
                })
            }
        };
        Ok(Llama::from_parts(
            cfg.clone(),
            t(self.embed)?,
            layers,
            t(self.final_norm)?,
            head,
            recursion,
        ))
    }
}
