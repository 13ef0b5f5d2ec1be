//! The exit policy between its gRPC form and the engine's, in both directions (requests name a
//! policy; registration tells the coordinator the worker's default), and what a request's
//! quality tier makes of it.

use rrt_engine::{ExitKind, ExitPolicy};
use rrt_proto::v1 as pb;

/// The engine policy a request asks for: `None` = the server's default (which load-adaptive
/// exits move); quality FULL = every loop. Validation has refused unknown values and FULL with
/// a policy.
pub fn requested(exit: Option<&pb::ExitParameters>, quality: i32) -> Option<ExitPolicy> {
    if pb::QualityTier::try_from(quality) == Ok(pb::QualityTier::Full) {
        return Some(ExitPolicy::NONE);
    }
    let e = exit?;
    let kind = match pb::ExitPolicy::try_from(e.policy).ok()? {
        pb::ExitPolicy::Unspecified => return None,
        pb::ExitPolicy::None => ExitKind::None,
        pb::ExitPolicy::MaxProb => ExitKind::MaxProb,
        pb::ExitPolicy::Margin => ExitKind::Margin,
        pb::ExitPolicy::Cosine => ExitKind::Cosine,
        pb::ExitPolicy::Learned => ExitKind::Learned,
    };
    Some(ExitPolicy {
        kind,
        threshold: e.threshold,
    })
}

/// The gRPC form of an engine policy (the benchmark-only kinds have none: `None`).
pub fn to_pb(p: ExitPolicy) -> Option<pb::ExitParameters> {
    let policy = match p.kind {
        ExitKind::None => pb::ExitPolicy::None,
        ExitKind::MaxProb => pb::ExitPolicy::MaxProb,
        ExitKind::Margin => pb::ExitPolicy::Margin,
        ExitKind::Cosine => pb::ExitPolicy::Cosine,
        ExitKind::Learned => pb::ExitPolicy::Learned,
        ExitKind::Replay | ExitKind::Oracle => return None,
    };
    Some(pb::ExitParameters {
        policy: policy as i32,
        threshold: p.threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_and_full_quality_runs_every_loop() {
        for kind in [
            ExitKind::None,
            ExitKind::MaxProb,
            ExitKind::Margin,
            ExitKind::Cosine,
            ExitKind::Learned,
        ] {
            let p = ExitPolicy {
                kind,
                threshold: 0.25,
            };
            assert_eq!(requested(to_pb(p).as_ref(), 0), Some(p));
        }
        assert_eq!(
            to_pb(ExitPolicy {
                kind: ExitKind::Oracle,
                threshold: 0.0
            }),
            None
        );
        let unspecified = pb::ExitParameters::default();
        assert_eq!(requested(Some(&unspecified), 0), None, "the default");
        assert_eq!(requested(None, pb::QualityTier::Adaptive as i32), None);
        assert_eq!(
            requested(None, pb::QualityTier::Full as i32),
            Some(ExitPolicy::NONE)
        );
    }
}
