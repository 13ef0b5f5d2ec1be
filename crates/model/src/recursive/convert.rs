//! Pretrained model -> relaxed recursive model. [`Converter::new`] picks the shared layers from
//! the source (per the [`Init`] method), [`Converter::decompose`] runs one thin SVD per residual
//! `W_l - W'_{l mod K}` (all N x 7 of them, two at a time), and [`Converter::build`] cuts LoRA of
//! any rank from those factors, so a sweep over ranks pays for the SVDs once.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::lora::{LayerLora, ProjLora};
use super::mapping::{check_shape, source_layers, Init};
use super::svd::Factors;
use super::{LoopNorms, Recursion, RecursiveMeta};
use crate::decoder::{LayerWeights, Llama};
use crate::error::{ModelError, Result};
use crate::projection::Projection;

/// What to build.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub block_layers: usize,
    pub init: Init,
    pub seed: u64,
    /// LoRA rank of q, k, v, o (0: none; >= min(dims): full rank).
    pub rank_attn: usize,
    /// LoRA rank of gate, up, down.
    pub rank_mlp: usize,
    /// Give every unrolled layer the source layer's own norms (exact full-rank recovery).
    pub per_loop_norms: bool,
    /// Recorded in the converted model's metadata.
    pub source: String,
}

/// Indexed by [`Projection::index`].
type Projections = [Vec<f32>; 7];

/// One layer's weights as plain row-major matrices.
struct PlainLayer {
    proj: Projections,
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
}

/// A source model taken apart, with the shared layers chosen.
pub struct Converter<'a> {
    src: &'a Llama,
    block: usize,
    init: Init,
    seed: u64,
    mapping: Vec<Vec<usize>>,
    /// Per source layer.
    layers: Vec<PlainLayer>,
    /// Per shared layer.
    shared: Vec<PlainLayer>,
    /// Per unrolled layer and projection, once [`Converter::decompose`] ran.
    factors: Option<Vec<Vec<Factors>>>,
}

fn mean(vectors: &[&Vec<f32>]) -> Vec<f32> {
    let n = vectors.len() as f32;
    let mut out = vec![0f32; vectors[0].len()];
    for v in vectors {
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += x;
        }
    }
    out.iter_mut().for_each(|o| *o /= n);
    out
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl<'a> Converter<'a> {
    pub fn new(src: &'a Llama, block_layers: usize, init: Init, seed: u64) -> Result<Self> {
        if src.recursion.is_some() {
            return Err(ModelError::InvalidInput(
                "the source is already a recursive model; convert its original instead".into(),
            ));
        }
        let n = src.layers.len();
        check_shape(n, block_layers)?;
        let mapping = source_layers(init, n, block_layers, seed)?;
        let layers = src
            .layers
            .iter()
            .map(|l| {
                let p = l.projections(&src.cfg)?;
                let proj: Vec<Vec<f32>> = p.iter().map(to_vec).collect::<Result<_>>()?;
                let proj: Projections = proj
                    .try_into()
                    .map_err(|_| ModelError::InvalidInput("7 projections".into()))?;
                Ok(PlainLayer {
                    proj,
                    attn_norm: to_vec(&l.attn_norm)?,
                    mlp_norm: to_vec(&l.mlp_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = mapping
            .iter()
            .map(|group| {
                let pick = |f: &dyn Fn(&PlainLayer) -> &Vec<f32>| {
                    mean(&group.iter().map(|&i| f(&layers[i])).collect::<Vec<_>>())
                };
                PlainLayer {
                    proj: std::array::from_fn(|p| pick(&|l| &l.proj[p])),
                    attn_norm: pick(&|l| &l.attn_norm),
                    mlp_norm: pick(&|l| &l.mlp_norm),
                }
            })
            .collect();
        Ok(Self {
            src,
            block: block_layers,
            init,
            seed,
            mapping,
            layers,
            shared,
            factors: None,
        })
    }

    /// Unrolled depth N.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Jobs [`Converter::decompose`] runs (N x 7).
    pub fn svd_jobs(&self) -> usize {
        self.depth() * Projection::ALL.len()
    }

    /// SVD of every residual; `progress` is called after each (from worker threads).
    pub fn decompose(&mut self, progress: &(dyn Fn() + Sync)) -> Result<()> {
        if self.factors.is_some() {
            return Ok(());
        }
        // faer's own threading is slower than one matrix per core here.
        faer::set_global_parallelism(faer::Par::Seq);
        let k = self.block;
        let jobs: Vec<(usize, Projection)> = (0..self.depth())
            .flat_map(|l| Projection::ALL.map(move |p| (l, p)))
            .collect();
        let done: Vec<Factors> = jobs
            .par_iter()
            .map(|&(l, p)| {
                let w = &self.layers[l].proj[p.index()];
                let shared = &self.shared[l % k].proj[p.index()];
                let residual: Vec<f32> = w.iter().zip(shared).map(|(a, b)| a - b).collect();
                let [out, inp] = p.shape(&self.src.cfg);
                let f = Factors::new(&residual, out, inp);
                progress();
                f
            })
            .collect::<Result<_>>()?;
        let mut it = done.into_iter();
        self.factors = Some(
            (0..self.depth())
                .map(|_| it.by_ref().take(7).collect())
                .collect(),
        );
        Ok(())
    }

    /// The recursive model with LoRA of the given ranks (decompose first when a rank is > 0).
    pub fn build(
        &self,
        rank_attn: usize,
        rank_mlp: usize,
        per_loop_norms: bool,
        source: &str,
    ) -> Result<Llama> {
        let cfg = &self.src.cfg;
        let dev = Device::Cpu;
        let tensor = |v: &Vec<f32>, shape: (usize, usize)| Tensor::from_slice(v, shape, &dev);
        let layers = self
            .shared
            .iter()
            .map(
                |PlainLayer {
                     proj,
                     attn_norm: an,
                     mlp_norm: mn,
                 }| {
                    let t: Vec<Tensor> = Projection::ALL
                        .iter()
                        .map(|p| {
                            let [o, i] = p.shape(cfg);
                            tensor(&proj[p.index()], (o, i))
                        })
                        .collect::<candle_core::Result<_>>()?;
                    let t: [Tensor; 7] = t
                        .try_into()
                        .map_err(|_| ModelError::InvalidInput("7 projections".into()))?;
                    LayerWeights::from_projections(
                        &t,
                        Tensor::from_slice(an, an.len(), &dev)?,
                        Tensor::from_slice(mn, mn.len(), &dev)?,
                    )
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let mut lora = Vec::with_capacity(self.depth());
        for l in 0..self.depth() {
            let mut layer = LayerLora::default();
            for p in Projection::ALL {
                let rank = if p.is_attention() {
                    rank_attn
                } else {
                    rank_mlp
                };
                if rank == 0 {
                    continue;
                }
                let factors = self.factors.as_ref().ok_or_else(|| {
                    ModelError::InvalidInput(
                        "LoRA rank > 0 needs the residual SVDs (decompose first)".into(),
                    )
                })?;
                let f = &factors[l][p.index()];
                let (out, inp) = f.shape();
                let r = rank.min(f.full_rank());
                let (a, b) = f.lora(r);
                layer.proj[p.index()] =
                    Some(ProjLora::new(tensor(&a, (r, inp))?, tensor(&b, (out, r))?)?);
            }
            lora.push(layer);
        }
        let loop_norms = if per_loop_norms {
            self.layers
                .iter()
                .map(
                    |PlainLayer {
                         attn_norm: an,
                         mlp_norm: mn,
                         ..
                     }| {
                        Ok(LoopNorms {
                            attn: Tensor::from_slice(an, an.len(), &dev)?,
                            mlp: Tensor::from_slice(mn, mn.len(), &dev)?,
                        })
                    },
                )
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let full = |r: usize, p: Projection| {
            let [o, i] = p.shape(cfg);
            r.min(o.min(i))
        };
        let meta = RecursiveMeta {
            source: source.to_string(),
            source_layers: self.depth(),
            block_layers: self.block,
            loops: self.depth() / self.block,
            init: self.init,
            seed: self.seed,
            lora_rank_attn: full(rank_attn, Projection::Q),
            lora_rank_mlp: full(rank_mlp, Projection::Gate),
            per_loop_norms,
            layer_mapping: self.mapping.clone(),
        };
        Ok(Llama::from_parts(
            cfg.clone(),
            self.src.embed.clone(),
            layers,
            self.src.norm.clone(),
            self.src.lm_head.clone(),
            Some(Recursion {
                meta,
                lora,
                loop_norms,
            }),
        ))
    }
}

/// Converts in one go (see [`Converter`] to build several ranks from one decomposition).
pub fn convert(src: &Llama, opts: &ConvertOptions, progress: &(dyn Fn() + Sync)) -> Result<Llama> {
    let mut c = Converter::new(src, opts.block_layers, opts.init, opts.seed)?;
    if opts.rank_attn > 0 || opts.rank_mlp > 0 {
        c.decompose(progress)?;
    }
    c.build(
        opts.rank_attn,
        opts.rank_mlp,
        opts.per_loop_norms,
        &opts.source,
    )
}
