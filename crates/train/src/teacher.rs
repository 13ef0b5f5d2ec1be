//! The teacher's distributions, computed once and cached on disk: for every window of a
//! corpus, each position's top-k logits and the log-sum-exp of all its logits at the
//! distillation temperature. The cache file is named by what it depends on (the teacher's
//! file, the tokens, the sequence length, k and the temperature), written atomically, and
//! reused across epochs and runs.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};

use crate::data::{fnv, Corpus};
use crate::error::{Result, TrainError};
use crate::loss::TeacherTopK;
use crate::model::{exits, Batch};
use crate::params::TrainModel;

const MAGIC: &[u8; 4] = b"RRTT";
const VERSION: u32 = 2;

/// What a cache depends on.
#[derive(Debug, Clone)]
pub struct CacheKey {
    /// The teacher's weights file or directory (with its size and modification time).
    pub teacher: PathBuf,
    pub corpus: u64,
    pub t: usize,
    pub k: usize,
    pub temperature: f32,
    /// The precision of the teacher's products.
    pub precision: crate::Precision,
}

impl CacheKey {
    fn file_name(&self) -> String {
        let meta = std::fs::metadata(&self.teacher).ok();
        let stamp = meta.map(|m| {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            (m.len(), modified.map(|d| d.as_secs()))
        });
        let id = format!(
            "{}|{stamp:?}|{}|{}|{}|{}",
            self.teacher.display(),
            self.corpus,
            self.t,
            self.k,
            self.temperature.to_bits()
        );
        // f32 caches keep the names they had before bf16 existed.
        let id = match self.precision {
            crate::Precision::F32 => id,
            p => format!("{id}|{p}"),
        };
        format!("teacher-{:016x}.bin", fnv(id.bytes()))
    }
}

/// The teacher's top-k of the windows of a corpus that runs have needed so far (window-major
/// slots; `present` says which are filled).
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherCache {
    pub t: usize,
    pub k: usize,
    pub windows: usize,
    pub temperature: f32,
    pub present: Vec<bool>,
    pub top: TeacherTopK,
    path: PathBuf,
}

impl TeacherCache {
    /// The cache of `key` in `dir` (empty when there is none yet, or it does not match).
    pub fn open(dir: &Path, key: &CacheKey, windows: usize) -> Self {
        let path = dir.join(key.file_name());
        match Self::read(&path) {
            Ok(c) if c.t == key.t && c.k == key.k && c.windows == windows => return c,
            Ok(_) => tracing::warn!(
                "{}: does not match this run; starting afresh",
                path.display()
            ),
            Err(e) if path.exists() => tracing::warn!("{e}; starting afresh"),
            Err(_) => {}
        }
        let (t, k) = (key.t, key.k);
        Self {
            t,
            k,
            windows,
            temperature: key.temperature,
            present: vec![false; windows],
            top: TeacherTopK {
                k,
                ids: vec![0; windows * t * k],
                logits: vec![0.0; windows * t * k],
                lse: vec![0.0; windows * t],
            },
            path,
        }
    }

    /// Windows of `needed` the cache lacks.
    pub fn missing(&self, needed: &[usize]) -> Vec<usize> {
        let mut m: Vec<usize> = needed
            .iter()
            .copied()
            .filter(|&w| !self.present[w])
            .collect();
        m.sort_unstable();
        m.dedup();
        m
    }

    /// Runs `teacher` over the missing windows of `needed` (in batches of `batch_seqs`,
    /// calling `progress(done, todo)`) and writes the cache when anything was added. Returns
    /// how many windows were computed.
    pub fn fill(
        &mut self,
        teacher: &TrainModel,
        corpus: &Corpus,
        needed: &[usize],
        batch_seqs: usize,
        progress: &dyn Fn(usize, usize),
    ) -> Result<usize> {
        let computed = self.compute(teacher, corpus, needed, batch_seqs, progress);
        if computed > 0 {
            self.write()?;
        }
        Ok(computed)
    }

    /// [`TeacherCache::fill`] in memory only ([`TeacherCache::save`] writes it): a training run
    /// computes each batch's windows as it reaches them.
    pub fn compute(
        &mut self,
        teacher: &TrainModel,
        corpus: &Corpus,
        needed: &[usize],
        batch_seqs: usize,
        progress: &dyn Fn(usize, usize),
    ) -> usize {
        let todo = self.missing(needed);
        for (done, chunk) in todo.chunks(batch_seqs.max(1)).enumerate() {
            let rows = compute(teacher, corpus, chunk, self.t, self.k, self.temperature);
            let (t, k) = (self.t, self.k);
            for (i, &w) in chunk.iter().enumerate() {
                let (a, b) = (i * t * k, (i + 1) * t * k);
                self.top.ids[w * t * k..(w + 1) * t * k].copy_from_slice(&rows.ids[a..b]);
                self.top.logits[w * t * k..(w + 1) * t * k].copy_from_slice(&rows.logits[a..b]);
                self.top.lse[w * t..(w + 1) * t].copy_from_slice(&rows.lse[i * t..(i + 1) * t]);
                self.present[w] = true;
            }
            progress(
                (done * batch_seqs.max(1) + chunk.len()).min(todo.len()),
                todo.len(),
            );
        }
        todo.len()
    }

    /// Writes the cache to its file.
    pub fn save(&self) -> Result<()> {
        self.write()
    }

    /// The rows of windows `ids`, in that order (a batch's teacher).
    pub fn batch(&self, ids: &[usize]) -> TeacherTopK {
        let (t, k) = (self.t, self.k);
        let mut out = TeacherTopK {
            k,
            ..Default::default()
        };
        for &w in ids {
            debug_assert!(self.present[w], "window {w} has no teacher outputs");
            out.ids
                .extend_from_slice(&self.top.ids[w * t * k..(w + 1) * t * k]);
            out.logits
                .extend_from_slice(&self.top.logits[w * t * k..(w + 1) * t * k]);
            out.lse.extend_from_slice(&self.top.lse[w * t..(w + 1) * t]);
        }
        out
    }

    /// Writes the cache (to a temporary file renamed over the old one).
    fn write(&self) -> Result<()> {
        let path = &self.path;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
        }
        let tmp = path.with_extension("tmp");
        let err =
            |e: std::io::Error| TrainError::file(&tmp, format!("writing the teacher cache: {e}"));
        let mut w = BufWriter::new(std::fs::File::create(&tmp).map_err(err)?);
        w.write_all(MAGIC).map_err(err)?;
        for v in [
            VERSION,
            self.t as u32,
            self.k as u32,
            self.windows as u32,
            self.temperature.to_bits(),
        ] {
            w.write_all(&v.to_le_bytes()).map_err(err)?;
        }
        let flags: Vec<u8> = self.present.iter().map(|&p| p as u8).collect();
        w.write_all(&flags).map_err(err)?;
        for x in &self.top.ids {
            w.write_all(&x.to_le_bytes()).map_err(err)?;
        }
        for x in self.top.logits.iter().chain(&self.top.lse) {
            w.write_all(&x.to_le_bytes()).map_err(err)?;
        }
        w.into_inner()
            .map_err(|e| err(e.into_error()))?
            .sync_all()
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::file(path, e))
    }

    fn read(path: &Path) -> Result<Self> {
        let err = |m: String| TrainError::file(path, format!("teacher cache: {m}"));
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut at = 0usize;
        let mut word = || -> Result<u32> {
            let w = bytes
                .get(at..at + 4)
                .ok_or_else(|| err("truncated".into()))?;
            at += 4;
            Ok(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        };
        if word()?.to_le_bytes() != *MAGIC || word()? != VERSION {
            return Err(err("not a teacher cache of this version".into()));
        }
        let (t, k, windows) = (word()? as usize, word()? as usize, word()? as usize);
        let temperature = f32::from_bits(word()?);
        let rows = windows * t;
        let flags = bytes
            .get(at..at + windows)
            .ok_or_else(|| err("truncated".into()))?;
        let present = flags.iter().map(|&f| f != 0).collect();
        at += windows;
        let words = |from: usize, n: usize| -> Result<Vec<u32>> {
            let b = bytes
                .get(from..from + 4 * n)
                .ok_or_else(|| err("truncated".into()))?;
            Ok(b.chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect())
        };
        let ids = words(at, rows * k)?;
        let logits = words(at + 4 * rows * k, rows * k)?
            .into_iter()
            .map(f32::from_bits)
            .collect();
        let lse = words(at + 8 * rows * k, rows)?
            .into_iter()
            .map(f32::from_bits)
            .collect();
        Ok(Self {
            t,
            k,
            windows,
            temperature,
            present,
            top: TeacherTopK {
                k,
                ids,
                logits,
                lse,
            },
            path: path.to_path_buf(),
        })
    }
}

/// The teacher's top-k and log-sum-exp of every position of `windows` of `corpus`.
fn compute(
    teacher: &TrainModel,
    corpus: &Corpus,
    windows: &[usize],
    t: usize,
    k: usize,
    tau: f32,
) -> TeacherTopK {
    let (v, h) = (teacher.cfg.vocab_size, teacher.cfg.hidden_size);
    let gf = teacher.params.get(teacher.final_norm);
    let head = teacher.params.get(teacher.head());
    let tokens = windows
        .iter()
        .flat_map(|&w| corpus.window(w, t).iter().copied())
        .collect();
    let batch = Batch {
        tokens,
        seqs: windows.len(),
        t,
        teacher: None,
    };
    let last = exits(teacher, &batch).pop().unwrap_or_default();
    let rows = batch.rows();
    let mut top = TeacherTopK {
        k,
        ..Default::default()
    };
    for c0 in (0..rows).step_by(64) {
        let c = (rows - c0).min(64);
        let (n, _) = crate::norm::forward(
            &last[c0 * h..(c0 + c) * h],
            gf,
            teacher.cfg.rms_norm_eps as f32,
        );
        let mut z = vec![0f32; c * v];
        match crate::precision::packed_head(teacher) {
            Some(pk) => rrt_model::kernels::gemm::gemm_bf16_packed(
                MatMut::new(&mut z, c, v),
                MatRef::new(&n, c, h),
                &pk.transposed,
                false,
            ),
            None => gemm(
                MatMut::new(&mut z, c, v),
                MatRef::new(&n, c, h),
                MatRef::new(head, v, h).t(),
                false,
            ),
        }
        let rows_top: Vec<(Vec<u32>, Vec<f32>, f32)> =
            z.par_chunks(v).map(|row| top_k(row, k, tau)).collect();
        for (i, l, lse) in rows_top {
            top.ids.extend(i);
            top.logits.extend(l);
            top.lse.push(lse);
        }
    }
    top
}

/// The `k` largest logits of `row` (ids and values, largest first) and `log sum exp(row / tau)`.
fn top_k(row: &[f32], k: usize, tau: f32) -> (Vec<u32>, Vec<f32>, f32) {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        row[b as usize].total_cmp(&row[a as usize])
    });
    let mut top: Vec<u32> = idx[..k].to_vec();
    top.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    let max = row[top[0] as usize] / tau;
    let inv = 1.0 / tau;
    let sum: f64 = row
        .iter()
        .map(|&x| rrt_model::kernels::exp_fast(x * inv - max) as f64)
        .sum();
    let values = top.iter().map(|&i| row[i as usize]).collect();
    (top, values, max + sum.ln() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_log_sum_exp() {
        let row = [0.5f32, 3.0, -1.0, 2.0, 2.5];
        let (ids, vals, lse) = top_k(&row, 3, 2.0);
        assert_eq!(ids, vec![1, 4, 3]);
        assert_eq!(vals, vec![3.0, 2.5, 2.0]);
        let want = row
            .iter()
            .map(|x| ((x / 2.0) as f64).exp())
            .sum::<f64>()
            .ln();
        assert!((lse as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn a_cache_reads_back_as_written_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey {
            teacher: dir.path().join("none"),
            corpus: 1,
            t: 2,
            k: 2,
            temperature: 1.5,
            precision: crate::Precision::F32,
        };
        let mut c = TeacherCache::open(dir.path(), &key, 3);
        assert_eq!(c.missing(&[2, 0, 2]), vec![0, 2]);
        c.present[1] = true;
        c.top.ids[4..8].copy_from_slice(&[1, 2, 3, 4]);
        c.top.lse[2..4].copy_from_slice(&[5.0, 6.0]);
        c.write().unwrap();
        let back = TeacherCache::open(dir.path(), &key, 3);
        assert_eq!(back, c);
        assert_eq!(back.batch(&[1]).ids, vec![1, 2, 3, 4]);
        std::fs::write(&c.path, b"nope").unwrap();
        assert!(
            !TeacherCache::open(dir.path(), &key, 3).present[1],
            "garbage starts afresh"
        );
    }
}
