//! The teacher's side of a run: load it, check it speaks the student's vocabulary, and fill
//! its top-k cache for every window the run will read (what the cache already holds is reused).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Event, Options};
use crate::data::Corpus;
use crate::error::{Result, TrainError};
use crate::teacher::{CacheKey, TeacherCache};
use crate::trainer::Trainer;
use crate::TrainModel;

/// Runs the teacher over every window the run will read that its cache lacks, and hands the
/// caches to the trainer.
pub(super) fn attach(
    trainer: &mut Trainer,
    o: &Options,
    tokenizer: &rrt_model::Tokenizer,
    source: Option<&str>,
    report: &dyn Fn(Event<'_>),
) -> Result<()> {
    if o.loss.kd == 0.0 {
        return Ok(());
    }
    let teacher_path = match (&o.teacher, source) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => PathBuf::from(s),
        (None, None) => {
            return Err(TrainError::Input(
                "--teacher: the model records no source to distill from; name one".into(),
            ))
        }
    };
    let teacher = rrt_model::load(&teacher_path, rrt_model::WeightDtype::F32).map_err(|e| {
        TrainError::Input(format!(
            "loading the teacher {}: {e}",
            teacher_path.display()
        ))
    })?;
    check_same_vocabulary(tokenizer, &teacher.tokenizer, &teacher_path)?;
    let mut teacher_model = TrainModel::from_llama(&teacher.model)?;
    // The teacher's products at the run's precision too (its outputs are cached per precision).
    teacher_model.precision = o.precision;
    let open = |corpus: &Corpus| {
        let key = CacheKey {
            teacher: teacher_path.clone(),
            corpus: corpus.fingerprint(),
            t: o.seq_len,
            k: o.top_k,
            temperature: o.loss.temperature,
            precision: o.precision,
        };
        TeacherCache::open(&o.teacher_cache, &key, corpus.windows(o.seq_len))
    };
    let fill = |cache: &mut TeacherCache,
                corpus: &Corpus,
                needed: &[usize],
                what: &str|
     -> Result<()> {
        let todo = cache.missing(needed).len();
        report(Event::Phase {
            what: format!("teacher top-{} of {what}", o.top_k),
            total: todo as u64,
        });
        let started = Instant::now();
        let computed = cache.fill(&teacher_model, corpus, needed, o.batch_seqs, &|done, _| {
            report(Event::Advance(done as u64))
        })?;
        report(Event::PhaseDone);
        let seconds = started.elapsed().as_secs_f64();
        report(Event::Line(format!(
            "teacher top-{} of {what}: {computed} sequences computed in {seconds:.0} s ({:.2} s a sequence of {}), {} from the cache",
            o.top_k,
            seconds / computed.max(1) as f64,
            o.seq_len,
            needed.len().min(cache.windows) - computed.min(needed.len())
        )));
        Ok(())
    };
    let eval_windows = trainer.eval_windows();
    // The held-out windows now (every evaluation reads them); the training windows as the
    // run reaches them (its first steps start at once; the cache is saved with checkpoints).
    let mut train_cache = open(&trainer.data.train);
    if trainer.data.eval.is_none() {
        fill(
            &mut train_cache,
            &trainer.data.train,
            &eval_windows,
            "the held-out windows",
        )?;
    }
    if let Some((corpus, _)) = &trainer.data.eval {
        let mut cache = open(corpus);
        fill(&mut cache, corpus, &eval_windows, "the held-out text")?;
        if let Some((_, t)) = &mut trainer.data.eval {
            *t = Some(cache);
        }
    }
    trainer.data.train_teacher = Some(train_cache);
    trainer.data.teacher = Some(teacher_model);
    Ok(())
}

/// Distillation needs the teacher to speak the student's vocabulary.
fn check_same_vocabulary(
    student: &rrt_model::Tokenizer,
    teacher: &rrt_model::Tokenizer,
    path: &Path,
) -> Result<()> {
    let probe = "The LORD is my shepherd; 1234 caf\u{e9} \u{1F600}\n  def f(x): return x";
    let (a, b) = (student.encode(probe)?, teacher.encode(probe)?);
    if student.vocab_size() != teacher.vocab_size() || a != b {
        return Err(TrainError::file(
            path,
            format!(
                "the teacher's tokenizer differs from the model's ({} vs {} tokens in the vocabulary); distillation needs the same one",
                teacher.vocab_size(),
                student.vocab_size()
            ),
        ));
    }
    Ok(())
}
