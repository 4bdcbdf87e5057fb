//! Load profiles: the request rate as a function of elapsed time, their command-line syntax, and
//! the open-loop schedule derived from them. Pure: no clock, no I/O; time is an argument.

use std::time::Duration;

use crate::{Error, Result};

/// The highest rate a profile may ask for, in requests per second: far above what one machine
/// can send, low enough that a typo (`50000000`) is caught instead of silently missed.
pub const MAX_RATE: f64 = 1_000_000.0;

/// Target request rate (requests per second) over time, for open-loop load.
///
/// Command-line syntax ([`RateProfile::parse`]); durations are `humantime` (`500ms`, `10s`,
/// `2m`, `1m30s`), rates are requests per second (decimals allowed):
///
/// | syntax | meaning |
/// | --- | --- |
/// | `500` or `constant:500` | 500 req/s throughout |
/// | `steps:200x10s,1000x20s,0x5s` | 200 req/s for 10 s, then 1000 for 20 s, then none for 5 s; the last rate holds after the steps |
/// | `ramp:100-2000/60s` | linear from 100 to 2000 req/s over 60 s, then 2000 |
/// | `spike:300,3000@20s+10s` | 300 req/s, 3000 from 20 s for 10 s, then 300 again |
#[derive(Debug, Clone, PartialEq)]
pub enum RateProfile {
    /// One rate throughout.
    Constant(f64),
    /// Each `(duration, rate)` held in turn; the last rate continues after the last step.
    Steps(Vec<(Duration, f64)>),
    /// Linear from `from` to `to` over `over`, then `to`.
    Ramp { from: f64, to: f64, over: Duration },
    /// `base`, except `peak` during `[at, at + hold)`.
    Spike {
        base: f64,
        peak: f64,
        at: Duration,
        hold: Duration,
    },
}

impl RateProfile {
    /// The rate asked for at `elapsed` since the start of the run.
    pub fn rate_at(&self, elapsed: Duration) -> f64 {
        match self {
            RateProfile::Constant(rate) => *rate,
            RateProfile::Steps(steps) => {
                let mut end = Duration::ZERO;
                for (length, rate) in steps {
                    end += *length;
                    if elapsed < end {
                        return *rate;
                    }
                }
                steps.last().map_or(0.0, |(_, rate)| *rate)
            }
            RateProfile::Ramp { from, to, over } => {
                if elapsed >= *over || over.is_zero() {
                    *to
                } else {
                    from + (to - from) * (elapsed.as_secs_f64() / over.as_secs_f64())
                }
            }
            RateProfile::Spike {
                base,
                peak,
                at,
                hold,
            } => {
                if elapsed >= *at && elapsed < *at + *hold {
                    *peak
                } else {
                    *base
                }
            }
        }
    }

    /// How long the profile has something to say: the steps' total, the ramp, the end of the
    /// spike; `None` for a constant rate. A natural default for the run's duration.
    pub fn length(&self) -> Option<Duration> {
        match self {
            RateProfile::Constant(_) => None,
            RateProfile::Steps(steps) => Some(steps.iter().map(|(d, _)| *d).sum()),
            RateProfile::Ramp { over, .. } => Some(*over),
            RateProfile::Spike { at, hold, .. } => Some(*at + *hold),
        }
    }

    /// The mean rate over `[from, to)`, sampled every millisecond (exact for step shapes up to
    /// the sampling, exact for ramps).
    pub fn mean_rate(&self, from: Duration, to: Duration) -> f64 {
        if to <= from {
            return self.rate_at(from);
        }
        let span = to - from;
        let samples = (span.as_millis() as u64).clamp(1, 100_000);
        let step = span / samples as u32;
        let sum: f64 = (0..samples)
            .map(|i| self.rate_at(from + step * i as u32 + step / 2))
            .sum();
        sum / samples as f64
    }

    /// Parses the command-line syntax documented on [`RateProfile`].
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidProfile {
            input: s.to_owned(),
            reason,
        };
        let text = s.trim();
        let (kind, body) = match text.split_once(':') {
            Some((kind, body)) => (kind.trim(), body.trim()),
            None => ("constant", text),
        };
        let profile = match kind {
            "constant" => RateProfile::Constant(rate(body).map_err(invalid)?),
            "steps" => {
                let mut steps = Vec::new();
                for (i, step) in body.split(',').enumerate() {
                    let (r, d) = step.split_once('x').ok_or_else(|| {
                        invalid(format!(
                            "step {} `{}`: expected RATExDURATION, e.g. 200x10s",
                            i + 1,
                            step.trim()
                        ))
                    })?;
                    let r = rate(r).map_err(|e| invalid(format!("step {}: {e}", i + 1)))?;
                    let d = duration(d).map_err(|e| invalid(format!("step {}: {e}", i + 1)))?;
                    steps.push((d, r));
                }
                RateProfile::Steps(steps)
            }
            "ramp" => {
                let (rates, over) = body.split_once('/').ok_or_else(|| {
                    invalid("expected ramp:FROM-TO/DURATION, e.g. ramp:100-2000/60s".into())
                })?;
                let (from, to) = rates.split_once('-').ok_or_else(|| {
                    invalid("expected ramp:FROM-TO/DURATION, e.g. ramp:100-2000/60s".into())
                })?;
                RateProfile::Ramp {
                    from: rate(from).map_err(&invalid)?,
                    to: rate(to).map_err(&invalid)?,
                    over: duration(over).map_err(&invalid)?,
                }
            }
            "spike" => {
                let shape = "expected spike:BASE,PEAK@AT+HOLD, e.g. spike:300,3000@20s+10s";
                let (rates, times) = body.split_once('@').ok_or_else(|| invalid(shape.into()))?;
                let (base, peak) = rates.split_once(',').ok_or_else(|| invalid(shape.into()))?;
                let (at, hold) = times.split_once('+').ok_or_else(|| invalid(shape.into()))?;
                let at = humantime::parse_duration(at.trim())
                    .map_err(|e| invalid(format!("`{}`: {e}", at.trim())))?;
                RateProfile::Spike {
                    base: rate(base).map_err(&invalid)?,
                    peak: rate(peak).map_err(&invalid)?,
                    at,
                    hold: duration(hold).map_err(&invalid)?,
                }
            }
            other => {
                return Err(invalid(format!(
                    "unknown profile `{other}` (expected a rate, constant:, steps:, ramp: or spike:)"
                )));
            }
        };
        profile.validate().map_err(invalid)?;
        Ok(profile)
    }

    /// Rates finite, within `0..=MAX_RATE`, some of them above zero; durations above zero.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let rates: Vec<f64> = match self {
            RateProfile::Constant(r) => vec![*r],
            RateProfile::Steps(steps) => {
                if steps.is_empty() {
                    return Err("steps: at least one step is needed".into());
                }
                if steps.iter().any(|(d, _)| d.is_zero()) {
                    return Err("steps: every step must last longer than 0 s".into());
                }
                steps.iter().map(|(_, r)| *r).collect()
            }
            RateProfile::Ramp { from, to, over } => {
                if over.is_zero() {
                    return Err("ramp: the ramp must last longer than 0 s".into());
                }
                vec![*from, *to]
            }
            RateProfile::Spike {
                base, peak, hold, ..
            } => {
                if hold.is_zero() {
                    return Err("spike: the spike must last longer than 0 s".into());
                }
                vec![*base, *peak]
            }
        };
        if let Some(bad) = rates
            .iter()
            .find(|r| !r.is_finite() || **r < 0.0 || **r > MAX_RATE)
        {
            return Err(format!(
                "rate {bad} is out of range (0 to {MAX_RATE} requests per second)"
            ));
        }
        if rates.iter().all(|r| *r == 0.0) {
            return Err("every rate is 0: nothing would be sent".into());
        }
        Ok(())
    }
}

fn rate(s: &str) -> std::result::Result<f64, String> {
    let s = s.trim();
    let value: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a rate (requests per second, e.g. 500 or 12.5)"))?;
    if !value.is_finite() || !(0.0..=MAX_RATE).contains(&value) {
        return Err(format!(
            "rate `{s}` is out of range (0 to {MAX_RATE} requests per second)"
        ));
    }
    Ok(value)
}

fn duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let d =
        humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 500ms, 10s, 2m)"))?;
    if d.is_zero() {
        return Err(format!("`{s}`: a duration must be longer than 0 s"));
    }
    Ok(d)
}

/// The open-loop send times of a profile: the n-th request is due when the integral of the rate
/// since the start reaches n. Exact where the rate is piecewise constant (constant, steps,
/// spike); a ramp is integrated in 1 ms slices at each slice's middle rate.
#[derive(Debug, Clone)]
pub struct Schedule {
    profile: RateProfile,
    end: Duration,
    /// Time up to which the rate has been integrated.
    cursor: Duration,
    /// Requests owed since the last one due (0..1).
    owed: f64,
}

/// The slice in which a ramp's rate is taken as constant.
const RAMP_SLICE: Duration = Duration::from_millis(1);

impl Schedule {
    /// Send times of `profile` in `[0, end)`.
    pub fn new(profile: RateProfile, end: Duration) -> Self {
        Self {
            profile,
            end,
            cursor: Duration::ZERO,
            owed: 0.0,
        }
    }

    /// When the next request is due, since the start; `None` once past the end.
    pub fn next_due(&mut self) -> Option<Duration> {
        while self.cursor < self.end {
            let (piece_end, rate) = self.piece(self.cursor);
            let piece_end = piece_end.min(self.end);
            if rate > 0.0 {
                let due = self.cursor + Duration::from_secs_f64((1.0 - self.owed) / rate);
                if due < piece_end {
                    self.cursor = due;
                    self.owed = 0.0;
                    return Some(due);
                }
                self.owed += rate * (piece_end - self.cursor).as_secs_f64();
            }
            self.cursor = piece_end;
        }
        None
    }

    /// The stretch starting at `t` over which the rate is (taken as) constant: its end and rate.
    fn piece(&self, t: Duration) -> (Duration, f64) {
        const FOREVER: Duration = Duration::MAX;
        match &self.profile {
            RateProfile::Constant(rate) => (FOREVER, *rate),
            RateProfile::Steps(steps) => {
                let mut end = Duration::ZERO;
                for (length, rate) in steps {
                    end += *length;
                    if t < end {
                        return (end, *rate);
                    }
                }
                (FOREVER, steps.last().map_or(0.0, |(_, rate)| *rate))
            }
            RateProfile::Ramp { to, over, .. } => {
                if t >= *over {
                    (FOREVER, *to)
                } else {
                    let slice_end = (t + RAMP_SLICE).min(*over);
                    (slice_end, self.profile.rate_at(t + (slice_end - t) / 2))
                }
            }
            RateProfile::Spike {
                base,
                peak,
                at,
                hold,
            } => {
                if t < *at {
                    (*at, *base)
                } else if t < *at + *hold {
                    (*at + *hold, *peak)
                } else {
                    (FOREVER, *base)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_bare_number_is_a_constant_rate() {
        assert_eq!(
            RateProfile::parse("500").unwrap(),
            RateProfile::Constant(500.0)
        );
        assert_eq!(
            RateProfile::parse(" constant:12.5 ").unwrap(),
            RateProfile::Constant(12.5)
        );
    }

    #[test]
    fn steps_ramp_and_spike_parse_into_their_shapes() {
        assert_eq!(
            RateProfile::parse("steps:200x10s,1000x20s,0x500ms").unwrap(),
            RateProfile::Steps(vec![(s(10.0), 200.0), (s(20.0), 1000.0), (s(0.5), 0.0)])
        );
        assert_eq!(
            RateProfile::parse("ramp:100-2000/1m").unwrap(),
            RateProfile::Ramp {
                from: 100.0,
                to: 2000.0,
                over: s(60.0)
            }
        );
        assert_eq!(
            RateProfile::parse("spike:300,3000@20s+10s").unwrap(),
            RateProfile::Spike {
                base: 300.0,
                peak: 3000.0,
                at: s(20.0),
                hold: s(10.0)
            }
        );
        assert_eq!(
            RateProfile::parse("spike:0,100@0s+1s").unwrap().length(),
            Some(s(1.0))
        );
    }

    #[test]
    fn malformed_profiles_are_refused_with_the_reason() {
        for (input, reason) in [
            ("", "not a rate"),
            ("abc", "not a rate"),
            ("-5", "out of range"),
            ("0", "nothing would be sent"),
            ("NaN", "out of range"),
            ("inf", "out of range"),
            ("2000000", "out of range"),
            ("steps:", "expected RATExDURATION"),
            ("steps:200x10s,300", "step 2"),
            ("steps:200x0s", "longer than 0 s"),
            ("steps:200x10", "step 1"),
            ("steps:0x10s", "nothing would be sent"),
            ("ramp:100/10s", "expected ramp:FROM-TO/DURATION"),
            ("ramp:100-200", "expected ramp:FROM-TO/DURATION"),
            ("ramp:100-200/0s", "longer than 0 s"),
            ("spike:300@1s+1s", "expected spike:BASE,PEAK@AT+HOLD"),
            ("spike:300,600@1s", "expected spike:BASE,PEAK@AT+HOLD"),
            ("spike:300,600@x+1s", "`x`"),
            ("wave:1-2", "unknown profile `wave`"),
        ] {
            let err = RateProfile::parse(input).expect_err(input).to_string();
            assert!(err.contains(reason), "{input:?}: {err}");
            assert!(err.contains(&format!("`{input}`")), "{input:?}: {err}");
        }
    }

    #[test]
    fn rate_at_follows_each_shape_and_holds_the_last_rate() {
        let steps = RateProfile::parse("steps:200x10s,1000x20s").unwrap();
        assert_eq!(steps.rate_at(s(0.0)), 200.0);
        assert_eq!(steps.rate_at(s(9.999)), 200.0);
        assert_eq!(steps.rate_at(s(10.0)), 1000.0);
        assert_eq!(steps.rate_at(s(100.0)), 1000.0);
        assert_eq!(steps.length(), Some(s(30.0)));

        let ramp = RateProfile::parse("ramp:100-2000/60s").unwrap();
        assert_eq!(ramp.rate_at(s(0.0)), 100.0);
        assert!((ramp.rate_at(s(30.0)) - 1050.0).abs() < 1e-9);
        assert_eq!(ramp.rate_at(s(60.0)), 2000.0);
        assert_eq!(ramp.rate_at(s(600.0)), 2000.0);

        let spike = RateProfile::parse("spike:300,3000@20s+10s").unwrap();
        assert_eq!(spike.rate_at(s(19.9)), 300.0);
        assert_eq!(spike.rate_at(s(20.0)), 3000.0);
        assert_eq!(spike.rate_at(s(29.9)), 3000.0);
        assert_eq!(spike.rate_at(s(30.0)), 300.0);
        assert_eq!(RateProfile::Constant(7.0).length(), None);
    }

    fn send_times(profile: &str, end: f64) -> Vec<Duration> {
        let mut schedule = Schedule::new(RateProfile::parse(profile).unwrap(), s(end));
        std::iter::from_fn(|| schedule.next_due()).collect()
    }

    #[test]
    fn a_constant_schedule_is_evenly_spaced() {
        let times = send_times("500", 1.0);
        assert!((499..=500).contains(&times.len()), "{}", times.len());
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            assert!((gap - 0.002).abs() < 1e-6, "gap {gap}");
        }
    }

    #[test]
    fn a_schedule_sends_the_integral_of_the_profile() {
        // 200 for 1 s, 1000 for 1 s, 0 for 1 s, then 100 held: 200 + 1000 + 0 + 100.
        let times = send_times("steps:200x1s,1000x1s,0x1s,100x1s", 4.0);
        let in_second = |k: u64| times.iter().filter(|t| t.as_secs() == k).count() as i64;
        for (k, want) in [(0, 200), (1, 1000), (2, 0), (3, 100)] {
            assert!(
                (in_second(k) - want).abs() <= 2,
                "second {k}: {}",
                in_second(k)
            );
        }
        // Ramp 0 -> 1000 over 2 s: area 1000, even though the rate starts at zero.
        let ramp = send_times("ramp:0-1000/2s", 2.0);
        assert!((ramp.len() as i64 - 1000).abs() <= 2, "{}", ramp.len());
        // Spike: 100 base, 1000 during [1 s, 1.5 s): 100 * 1.5 + 1000 * 0.5 over 2 s.
        let spike = send_times("spike:100,1000@1s+500ms", 2.0);
        assert!((spike.len() as i64 - 650).abs() <= 2, "{}", spike.len());
        // A low rate is not rounded up to the 1 ms step.
        assert_eq!(send_times("2", 10.0).len(), 19);
    }

    #[test]
    fn mean_rate_averages_over_the_window() {
        let p = RateProfile::parse("steps:100x500ms,300x500ms").unwrap();
        assert!((p.mean_rate(s(0.0), s(1.0)) - 200.0).abs() < 1.0);
    }
}
