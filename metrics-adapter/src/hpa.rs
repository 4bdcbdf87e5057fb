//! The HorizontalPodAutoscaler's arithmetic for external metrics, as pure functions.
//!
//! Mirrors `pkg/controller/podautoscaler` (replica_calculator.go and horizontal.go): the
//! per-metric proposal for `Value` and `AverageValue` targets with the tolerance band, the max
//! over metrics (and how failed metrics freeze scale-down), then stabilization windows and
//! `behavior` rate policies. Time is a parameter (`now`, seconds on any monotonic scale) and
//! history is passed in, so `explain` evaluates one sync and an HPA simulator can replay many.

/// The controller's default tolerance (`--horizontal-pod-autoscaler-tolerance`).
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// The HPA sync period (`--horizontal-pod-autoscaler-sync-period`), seconds.
pub const SYNC_PERIOD_SECONDS: i64 = 15;
/// Default scale-down stabilization window (`--horizontal-pod-autoscaler-downscale-stabilization`).
pub const DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS: i32 = 300;

/// What an external metric is compared with (`spec.metrics[].external.target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `type: Value`: the metric's total against this value (milli-units).
    Value(i64),
    /// `type: AverageValue`: the metric's total divided by the replica count (milli-units).
    AverageValue(i64),
}

/// Allowed relative deviation from the target in each direction before the HPA acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    pub scale_down: f64,
    pub scale_up: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            scale_down: DEFAULT_TOLERANCE,
            scale_up: DEFAULT_TOLERANCE,
        }
    }
}

impl Tolerances {
    /// `(1 - down) <= ratio <= (1 + up)`: no change.
    pub fn is_within(&self, ratio: f64) -> bool {
        (1.0 - self.scale_down) <= ratio && ratio <= (1.0 + self.scale_up)
    }
}

/// One metric's proposal and how it was reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Proposal {
    pub replicas: i32,
    /// usage / target (for AverageValue: usage / (target * statusReplicas)).
    pub usage_ratio: f64,
    /// The ratio fell inside the tolerance band, so the current count was kept.
    pub within_tolerance: bool,
}

/// Contract items 10-12: the replica count one external metric asks for.
///
/// `usage_milli` is the sum of the items' milli-values (the HPA adds them up); `current` is the
/// scale's current replicas (`statusReplicas` for AverageValue); `ready_pods` counts ready pods
/// (used by `Value` targets).
pub fn external_proposal(
    usage_milli: i64,
    target: Target,
    current: i32,
    ready_pods: i32,
    tol: Tolerances,
) -> Proposal {
    match target {
        Target::Value(target) => {
            let ratio = usage_milli as f64 / target as f64;
            if current != 0 {
                if tol.is_within(ratio) {
                    return Proposal {
                        replicas: current,
                        usage_ratio: ratio,
                        within_tolerance: true,
                    };
                }
                Proposal {
                    replicas: ceil_i32(ratio * f64::from(ready_pods)),
                    usage_ratio: ratio,
                    within_tolerance: false,
                }
            } else {
                Proposal {
                    replicas: ceil_i32(ratio),
                    usage_ratio: ratio,
                    within_tolerance: false,
                }
            }
        }
        Target::AverageValue(target) => {
            let ratio = usage_milli as f64 / (target as f64 * f64::from(current));
            if tol.is_within(ratio) {
                Proposal {
                    replicas: current,
                    usage_ratio: ratio,
                    within_tolerance: true,
                }
            } else {
                Proposal {
                    replicas: ceil_i32(usage_milli as f64 / target as f64),
                    usage_ratio: ratio,
                    within_tolerance: false,
                }
            }
        }
    }
}

fn ceil_i32(x: f64) -> i32 {
    // Go's int32(math.Ceil(x)) for the ranges that occur; saturate instead of wrapping.
    let c = x.ceil();
    if c.is_nan() {
        0
    } else if c >= f64::from(i32::MAX) {
        i32::MAX
    } else if c <= f64::from(i32::MIN) {
        i32::MIN
    } else {
        c as i32
    }
}

/// Contract item 13, first half: the largest proposal wins; a failed metric blocks the
/// decision when every metric failed, or when the others would scale down (so a broken metric
/// freezes scale-down but never blocks scale-up).
pub fn combine(proposals: &[Result<i32, String>], current: i32) -> Result<i32, String> {
    let mut best: Option<i32> = None;
    let mut first_error = None;
    for p in proposals {
        match p {
            Ok(r) => best = Some(best.map_or(*r, |b| b.max(*r))),
            Err(e) => {
                first_error.get_or_insert_with(|| e.clone());
            }
        }
    }
    match (best, first_error) {
        (None, Some(e)) => Err(e),
        (None, None) => Err("the HPA has no metrics".to_owned()),
        (Some(b), Some(e)) if b < current => Err(format!(
            "{e} (scale-down is held while a metric is failing)"
        )),
        (Some(b), _) => Ok(b),
    }
}

/// `behavior.scaleUp|scaleDown.selectPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectPolicy {
    Max,
    Min,
    Disabled,
}

/// `behavior.*.policies[].type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Pods,
    Percent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub kind: PolicyKind,
    pub value: i32,
    pub period_seconds: i32,
}

/// `behavior.scaleUp` or `behavior.scaleDown`, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRules {
    pub stabilization_window_seconds: i32,
    pub select_policy: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
    pub tolerance: Option<f64>,
}

impl ScalingRules {
    /// Defaults for `scaleUp`: no stabilization, the larger of +4 pods or +100% per 15 s.
    pub fn default_scale_up() -> Self {
        ScalingRules {
            stabilization_window_seconds: 0,
            select_policy: SelectPolicy::Max,
            policies: vec![
                ScalingPolicy {
                    kind: PolicyKind::Pods,
                    value: 4,
                    period_seconds: 15,
                },
                ScalingPolicy {
                    kind: PolicyKind::Percent,
                    value: 100,
                    period_seconds: 15,
                },
            ],
            tolerance: None,
        }
    }

    /// Defaults for `scaleDown`: a 300 s window, down to minReplicas (100%) per 15 s.
    pub fn default_scale_down() -> Self {
        ScalingRules {
            stabilization_window_seconds: DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS,
            select_policy: SelectPolicy::Max,
            policies: vec![ScalingPolicy {
                kind: PolicyKind::Percent,
                value: 100,
                period_seconds: 15,
            }],
            tolerance: None,
        }
    }
}

/// `spec.behavior` with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            scale_up: ScalingRules::default_scale_up(),
            scale_down: ScalingRules::default_scale_down(),
        }
    }
}

impl Behavior {
    /// The tolerance band, per-direction tolerances overriding the controller default.
    pub fn tolerances(&self) -> Tolerances {
        Tolerances {
            scale_down: self.scale_down.tolerance.unwrap_or(DEFAULT_TOLERANCE),
            scale_up: self.scale_up.tolerance.unwrap_or(DEFAULT_TOLERANCE),
        }
    }
}

/// A past unstabilized recommendation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recommendation {
    pub at: f64,
    pub replicas: i32,
}

/// A past scale change (replicas added or removed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleEvent {
    pub at: f64,
    pub change: i32,
}

/// What the controller remembers about one HPA between syncs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub recommendations: Vec<Recommendation>,
    pub scale_up_events: Vec<ScaleEvent>,
    pub scale_down_events: Vec<ScaleEvent>,
}

impl History {
    /// A controller seeing the HPA for the first time (`recordInitialRecommendation`): it
    /// records the current count as a recommendation, so it never scales down right after a
    /// restart (a window of 0 s ignores the seed).
    pub fn fresh(now: f64, current: i32) -> History {
        History {
            recommendations: vec![Recommendation {
                at: now,
                replicas: current,
            }],
            ..History::default()
        }
    }
}

/// The outcome of one sync.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the metrics asked for (max over metrics), before any limit.
    pub proposed: i32,
    /// After the stabilization windows.
    pub stabilized: i32,
    /// The replica count the HPA sets.
    pub replicas: i32,
    /// The controller's condition reason for the last limit applied
    /// (e.g. `ScaleDownStabilized`, `ScaleUpLimit`, `TooManyReplicas`, `DesiredWithinRange`).
    pub reason: String,
}

/// Inputs of one sync beyond the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// `spec.behavior` with defaults applied, or `None` when the manifest has none: the API
    /// server does not fill in an absent `behavior`, and the controller then runs its original
    /// normalization ([`decide`] explains the difference).
    pub behavior: Option<Behavior>,
}

impl Spec {
    /// The tolerance band: per-direction tolerances of `behavior` over the controller default.
    pub fn tolerances(&self) -> Tolerances {
        self.behavior
            .as_ref()
            .map_or_else(Tolerances::default, Behavior::tolerances)
    }

    /// The scale-down stabilization window, seconds (the controller's 300 s without `behavior`).
    pub fn scale_down_window_seconds(&self) -> i32 {
        self.behavior
            .as_ref()
            .map_or(DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS, |b| {
                b.scale_down.stabilization_window_seconds
            })
    }

    /// The scale-up stabilization window, seconds (none without `behavior`).
    pub fn scale_up_window_seconds(&self) -> i32 {
        self.behavior
            .as_ref()
            .map_or(0, |b| b.scale_up.stabilization_window_seconds)
    }
}

/// Contract item 13, second half: from the metrics' proposal to the replica count set, with
/// `history` (updated in place: the recommendation and any scale event are recorded).
///
/// With `behavior` this is `normalizeDesiredReplicasWithBehaviors`: both stabilization windows,
/// then the rate policies over their periods. Without it, `normalizeDesiredReplicas`: the
/// highest recommendation of the last 300 s (counting the one being made), then at most
/// `max(2 x current, 4)` per sync upwards and nothing but `minReplicas` downwards. So an HPA
/// without `behavior` does not get the documented default policies (+4 pods or +100% per
/// 15 s): from 2 replicas it goes to 4, not 6.
pub fn decide(
    spec: &Spec,
    current: i32,
    proposed: i32,
    now: f64,
    history: &mut History,
) -> Decision {
    if current == 0 && spec.min_replicas != 0 {
        return Decision {
            proposed,
            stabilized: 0,
            replicas: 0,
            reason: "ScalingDisabled".to_owned(),
        };
    }
    if current > spec.max_replicas {
        return Decision {
            proposed,
            stabilized: spec.max_replicas,
            replicas: spec.max_replicas,
            reason: "TooManyReplicas".to_owned(),
        };
    }
    if current < spec.min_replicas {
        return Decision {
            proposed,
            stabilized: spec.min_replicas,
            replicas: spec.min_replicas,
            reason: "TooFewReplicas".to_owned(),
        };
    }
    let Some(behavior) = &spec.behavior else {
        return decide_without_behavior(spec, current, proposed, now, history);
    };
    let (stabilized, stab_reason) = stabilize(behavior, current, proposed, now, history);
    let (replicas, rate_reason) =
        apply_rate_limits(spec, behavior, current, stabilized, now, history);
    let change = replicas - current;
    if change > 0 {
        history.scale_up_events.push(ScaleEvent { at: now, change });
    } else if change < 0 {
        history.scale_down_events.push(ScaleEvent {
            at: now,
            change: -change,
        });
    }
    let reason = if replicas != stabilized {
        rate_reason
    } else if stabilized != proposed {
        stab_reason
    } else {
        rate_reason
    };
    Decision {
        proposed,
        stabilized,
        replicas,
        reason,
    }
}

/// The controller's scale-up limit per sync when the HPA has no `behavior`.
fn legacy_scale_up_limit(current: i32) -> i32 {
    // int32(math.Max(2.0 * float64(current), 4.0))
    ceil_i32((2.0 * f64::from(current)).max(4.0))
}

/// `normalizeDesiredReplicas` + `convertDesiredReplicasWithRules`: no scale events are kept.
fn decide_without_behavior(
    spec: &Spec,
    current: i32,
    proposed: i32,
    now: f64,
    history: &mut History,
) -> Decision {
    // stabilizeRecommendation: the max over recommendations not older than the window
    // (`!Before(cutoff)`, so one exactly at the cutoff still counts), then this one recorded.
    let cutoff = now - f64::from(DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS);
    let stabilized = history
        .recommendations
        .iter()
        .filter(|r| r.at >= cutoff)
        .map(|r| r.replicas)
        .fold(proposed, i32::max);
    history.recommendations.retain(|r| r.at >= cutoff);
    history.recommendations.push(Recommendation {
        at: now,
        replicas: proposed,
    });
    let limit = legacy_scale_up_limit(current);
    let (maximum, max_reason) = if spec.max_replicas > limit {
        (limit, "ScaleUpLimit")
    } else {
        (spec.max_replicas, "TooManyReplicas")
    };
    let (replicas, rate_reason) = if stabilized < spec.min_replicas {
        (spec.min_replicas, "TooFewReplicas")
    } else if stabilized > maximum {
        (maximum, max_reason)
    } else {
        (stabilized, "DesiredWithinRange")
    };
    let reason = if replicas == stabilized && stabilized != proposed {
        "ScaleDownStabilized"
    } else {
        rate_reason
    };
    Decision {
        proposed,
        stabilized,
        replicas,
        reason: reason.to_owned(),
    }
}

fn stabilize(
    behavior: &Behavior,
    current: i32,
    desired: i32,
    now: f64,
    history: &mut History,
) -> (i32, String) {
    let up_cutoff = now - f64::from(behavior.scale_up.stabilization_window_seconds);
    let down_cutoff = now - f64::from(behavior.scale_down.stabilization_window_seconds);
    let mut up = desired;
    let mut down = desired;
    for r in &history.recommendations {
        if r.at > up_cutoff {
            up = up.min(r.replicas);
        }
        if r.at > down_cutoff {
            down = down.max(r.replicas);
        }
    }
    let mut recommendation = current;
    let mut reason = "ReadyForNewScale";
    if recommendation < up {
        recommendation = up;
    }
    if recommendation > down {
        recommendation = down;
    }
    if recommendation != desired {
        reason = if desired > current {
            "ScaleUpStabilized"
        } else {
            "ScaleDownStabilized"
        };
    }
    // Record the unstabilized recommendation, dropping what both windows have left behind.
    let oldest = up_cutoff.min(down_cutoff);
    history.recommendations.retain(|r| r.at > oldest);
    history.recommendations.push(Recommendation {
        at: now,
        replicas: desired,
    });
    (recommendation, reason.to_owned())
}

fn changed_within(events: &[ScaleEvent], period_seconds: i32, now: f64) -> i32 {
    let cutoff = now - f64::from(period_seconds);
    events
        .iter()
        .filter(|e| e.at > cutoff)
        .map(|e| e.change)
        .sum()
}

fn scale_up_limit(current: i32, rules: &ScalingRules, history: &History, now: f64) -> i32 {
    let (mut result, pick): (i32, fn(i32, i32) -> i32) = match rules.select_policy {
        SelectPolicy::Disabled => return current,
        SelectPolicy::Min => (i32::MAX, i32::min),
        SelectPolicy::Max => (i32::MIN, i32::max),
    };
    for p in &rules.policies {
        let added = changed_within(&history.scale_up_events, p.period_seconds, now);
        let removed = changed_within(&history.scale_down_events, p.period_seconds, now);
        let start = current - added + removed;
        let proposed = match p.kind {
            PolicyKind::Pods => start.saturating_add(p.value),
            PolicyKind::Percent => ceil_i32(f64::from(start) * (1.0 + f64::from(p.value) / 100.0)),
        };
        result = pick(result, proposed);
    }
    result
}

fn scale_down_limit(current: i32, rules: &ScalingRules, history: &History, now: f64) -> i32 {
    let (mut result, pick): (i32, fn(i32, i32) -> i32) = match rules.select_policy {
        SelectPolicy::Disabled => return current,
        SelectPolicy::Min => (i32::MIN, i32::max),
        SelectPolicy::Max => (i32::MAX, i32::min),
    };
    for p in &rules.policies {
        let added = changed_within(&history.scale_up_events, p.period_seconds, now);
        let removed = changed_within(&history.scale_down_events, p.period_seconds, now);
        let start = current - added + removed;
        let proposed = match p.kind {
            PolicyKind::Pods => start - p.value,
            // Go truncates here (int32 conversion), unlike the scale-up ceiling.
            PolicyKind::Percent => (f64::from(start) * (1.0 - f64::from(p.value) / 100.0)) as i32,
        };
        result = pick(result, proposed);
    }
    result
}

fn apply_rate_limits(
    spec: &Spec,
    behavior: &Behavior,
    current: i32,
    desired: i32,
    now: f64,
    history: &History,
) -> (i32, String) {
    if desired > current {
        let limit = scale_up_limit(current, &behavior.scale_up, history, now).max(current);
        let (maximum, reason) = if spec.max_replicas > limit {
            (limit, "ScaleUpLimit")
        } else {
            (spec.max_replicas, "TooManyReplicas")
        };
        if desired > maximum {
            return (maximum, reason.to_owned());
        }
    } else if desired < current {
        let limit = scale_down_limit(current, &behavior.scale_down, history, now).min(current);
        let (minimum, reason) = if spec.min_replicas < limit {
            (limit, "ScaleDownLimit")
        } else {
            (spec.min_replicas, "TooFewReplicas")
        };
        if desired < minimum {
            return (minimum, reason.to_owned());
        }
    }
    (desired, "DesiredWithinRange".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerances = Tolerances {
        scale_down: 0.1,
        scale_up: 0.1,
    };

    fn spec(min: i32, max: i32) -> Spec {
        Spec {
            min_replicas: min,
            max_replicas: max,
            behavior: Some(Behavior::default()),
        }
    }

    fn behavior(s: &mut Spec) -> &mut Behavior {
        s.behavior.as_mut().unwrap()
    }

    // Worked examples (contract items 10-12).

    #[test]
    fn value_target_scales_with_the_ratio_times_ready_pods() {
        // 2.5k rps against a 1k target on 2 ready pods: ratio 2.5 -> ceil(5.0) = 5.
        let p = external_proposal(2_500_000, Target::Value(1_000_000), 2, 2, TOL);
        assert_eq!(
            p,
            Proposal {
                replicas: 5,
                usage_ratio: 2.5,
                within_tolerance: false
            }
        );
    }

    #[test]
    fn value_target_within_tolerance_keeps_the_current_count() {
        // 1.08 is inside [0.9, 1.1].
        let p = external_proposal(1_080_000, Target::Value(1_000_000), 4, 4, TOL);
        assert_eq!((p.replicas, p.within_tolerance), (4, true));
        // Exactly at the edge (1.1) still holds; just past it moves.
        assert_eq!(
            external_proposal(1_100, Target::Value(1_000), 4, 4, TOL).replicas,
            4
        );
        assert_eq!(
            external_proposal(1_101, Target::Value(1_000), 4, 4, TOL).replicas,
            5
        );
        assert_eq!(
            external_proposal(899, Target::Value(1_000), 4, 4, TOL).replicas,
            4
        ); // ceil(3.596)
    }

    #[test]
    fn value_target_uses_ready_pods_not_the_current_count() {
        // 3 of 5 pods ready, ratio 2: ceil(2 * 3) = 6.
        assert_eq!(
            external_proposal(2_000, Target::Value(1_000), 5, 3, TOL).replicas,
            6
        );
    }

    #[test]
    fn value_target_from_zero_replicas_is_the_ceiling_of_the_ratio() {
        assert_eq!(
            external_proposal(2_300, Target::Value(1_000), 0, 0, TOL).replicas,
            3
        );
        assert_eq!(
            external_proposal(1_000, Target::Value(1_000), 0, 0, TOL).replicas,
            1
        );
    }

    #[test]
    fn average_value_divides_the_total_by_the_target_per_pod() {
        // 800m depletion against 200m per pod on 3 replicas: ratio 800/(200*3) = 1.33 -> ceil(4) = 4.
        let p = external_proposal(800, Target::AverageValue(200), 3, 3, TOL);
        assert_eq!(p.replicas, 4);
        assert!((p.usage_ratio - 1.3333).abs() < 1e-3);
        // 1250 rps total against 500 per pod on 2 replicas: ratio 1.25 -> ceil(2.5) = 3.
        assert_eq!(
            external_proposal(1_250_000, Target::AverageValue(500_000), 2, 2, TOL).replicas,
            3
        );
        // Within tolerance: 610/(200*3) = 1.0167 keeps 3.
        assert_eq!(
            external_proposal(610, Target::AverageValue(200), 3, 3, TOL).replicas,
            3
        );
    }

    #[test]
    fn value_and_average_value_differ_for_the_same_numbers() {
        // Usage 3000m, target 1000m, 2 replicas: Value -> ceil(3 * 2) = 6; AverageValue -> ceil(3) = 3.
        assert_eq!(
            external_proposal(3_000, Target::Value(1_000), 2, 2, TOL).replicas,
            6
        );
        assert_eq!(
            external_proposal(3_000, Target::AverageValue(1_000), 2, 2, TOL).replicas,
            3
        );
    }

    #[test]
    fn per_direction_tolerances_are_honoured() {
        let tol = Tolerances {
            scale_down: 0.5,
            scale_up: 0.01,
        };
        assert_eq!(
            external_proposal(600, Target::Value(1_000), 10, 10, tol).replicas,
            10
        );
        assert_eq!(
            external_proposal(1_020, Target::Value(1_000), 10, 10, tol).replicas,
            11
        );
    }

    // Item 13.

    #[test]
    fn the_largest_proposal_wins() {
        assert_eq!(combine(&[Ok(3), Ok(7), Ok(5)], 4), Ok(7));
    }

    #[test]
    fn a_failed_metric_freezes_scale_down_but_not_scale_up() {
        assert!(combine(&[Ok(2), Err("no metrics returned".into())], 4).is_err());
        assert_eq!(
            combine(&[Ok(6), Err("no metrics returned".into())], 4),
            Ok(6)
        );
        assert!(combine(&[Err("x".into())], 4).is_err());
    }

    #[test]
    fn scale_up_is_limited_to_the_larger_of_4_pods_or_100_percent() {
        let mut h = History::default();
        // From 2: max(2 + 4, 2 * 2) = 6.
        let d = decide(&spec(1, 100), 2, 20, 0.0, &mut h);
        assert_eq!((d.replicas, d.reason.as_str()), (6, "ScaleUpLimit"));
        // From 10: max(14, 20) = 20.
        let d = decide(&spec(1, 100), 10, 50, 0.0, &mut History::default());
        assert_eq!(d.replicas, 20);
        // Within 15 s of the first step, the period's start (2) still bounds it.
        let d = decide(&spec(1, 100), 6, 20, 10.0, &mut h);
        assert_eq!(d.replicas, 6);
        // After the period, scaling resumes from 6: max(10, 12) = 12.
        let d = decide(&spec(1, 100), 6, 20, 16.0, &mut h);
        assert_eq!(d.replicas, 12);
    }

    #[test]
    fn max_replicas_caps_the_result() {
        let d = decide(&spec(1, 5), 4, 9, 0.0, &mut History::default());
        assert_eq!((d.replicas, d.reason.as_str()), (5, "TooManyReplicas"));
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let s = spec(1, 10);
        let mut h = History::fresh(0.0, 8);
        // Metrics want 2 right after start: the window holds 8.
        let d = decide(&s, 8, 2, 15.0, &mut h);
        assert_eq!(
            (d.stabilized, d.replicas, d.reason.as_str()),
            (8, 8, "ScaleDownStabilized")
        );
        // Still 8 at 299 s (the seed is inside the 300 s window) ...
        assert_eq!(decide(&s, 8, 2, 299.0, &mut h).replicas, 8);
        // ... and the 15 s recommendation of 2 is what is left once the seed expires.
        assert_eq!(decide(&s, 8, 2, 300.5, &mut h).replicas, 2);
    }

    #[test]
    fn min_replicas_floors_the_result() {
        let mut s = spec(3, 10);
        behavior(&mut s).scale_down.stabilization_window_seconds = 0;
        let d = decide(&s, 6, 1, 0.0, &mut History::default());
        assert_eq!((d.replicas, d.reason.as_str()), (3, "TooFewReplicas"));
    }

    #[test]
    fn scale_down_percent_policies_truncate_as_go_does() {
        let mut s = spec(1, 100);
        behavior(&mut s).scale_down = ScalingRules {
            stabilization_window_seconds: 0,
            select_policy: SelectPolicy::Max,
            policies: vec![ScalingPolicy {
                kind: PolicyKind::Percent,
                value: 10,
                period_seconds: 60,
            }],
            tolerance: None,
        };
        // 15 * 0.9 = 13.5 -> 13.
        assert_eq!(decide(&s, 15, 1, 0.0, &mut History::default()).replicas, 13);
    }

    #[test]
    fn a_disabled_direction_never_moves() {
        let mut s = spec(1, 100);
        behavior(&mut s).scale_up.select_policy = SelectPolicy::Disabled;
        assert_eq!(decide(&s, 3, 9, 0.0, &mut History::default()).replicas, 3);
    }

    fn no_behavior(min: i32, max: i32) -> Spec {
        Spec {
            min_replicas: min,
            max_replicas: max,
            behavior: None,
        }
    }

    #[test]
    fn without_behavior_scale_up_is_limited_to_double_or_four_per_sync() {
        // From 2: max(4, 4) = 4 (the documented default policies would allow 6).
        let d = decide(&no_behavior(1, 100), 2, 20, 0.0, &mut History::default());
        assert_eq!((d.replicas, d.reason.as_str()), (4, "ScaleUpLimit"));
        // From 1: max(2, 4) = 4. From 10: 20.
        assert_eq!(
            decide(&no_behavior(1, 100), 1, 20, 0.0, &mut History::default()).replicas,
            4
        );
        assert_eq!(
            decide(&no_behavior(1, 100), 10, 50, 0.0, &mut History::default()).replicas,
            20
        );
        // No period: the next sync doubles again from the new count.
        let mut h = History::default();
        assert_eq!(decide(&no_behavior(1, 100), 4, 50, 0.0, &mut h).replicas, 8);
        assert_eq!(
            decide(&no_behavior(1, 100), 8, 50, 1.0, &mut h).replicas,
            16
        );
        // maxReplicas below the limit names TooManyReplicas.
        let d = decide(&no_behavior(1, 5), 4, 9, 0.0, &mut History::default());
        assert_eq!((d.replicas, d.reason.as_str()), (5, "TooManyReplicas"));
    }

    #[test]
    fn without_behavior_the_highest_recommendation_of_300_s_holds_and_then_drops_at_once() {
        let s = no_behavior(2, 20);
        let mut h = History::fresh(0.0, 10);
        let d = decide(&s, 10, 3, 15.0, &mut h);
        assert_eq!(
            (d.stabilized, d.replicas, d.reason.as_str()),
            (10, 10, "ScaleDownStabilized")
        );
        // A recommendation exactly 300 s old still counts (Go: !Before(cutoff)) ...
        assert_eq!(decide(&s, 10, 3, 300.0, &mut h).replicas, 10);
        // ... and once it is older, down to the highest of the rest in one step (no rate
        // policy), floored by minReplicas.
        assert_eq!(decide(&s, 10, 1, 300.5, &mut h).replicas, 3);
        let mut h = History::default();
        let d = decide(&s, 10, 1, 0.0, &mut h);
        assert_eq!((d.replicas, d.reason.as_str()), (2, "TooFewReplicas"));
    }

    #[test]
    fn counts_outside_min_max_are_corrected_first() {
        assert_eq!(
            decide(&spec(2, 5), 9, 9, 0.0, &mut History::default()).replicas,
            5
        );
        assert_eq!(
            decide(&spec(2, 5), 1, 1, 0.0, &mut History::default()).replicas,
            2
        );
        assert_eq!(
            decide(&spec(2, 5), 0, 4, 0.0, &mut History::default()).reason,
            "ScalingDisabled"
        );
    }
}
