//! `Ttl`: a validated SVID or token lifetime, parsed at the edge.
//!
//! Accepted forms: plain seconds (`600`) or a duration (`90s`, `5m`, `8h`, `1d`).
//! A TTL of zero or above [`Ttl::MAX`] is refused.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A lifetime between one second and [`Ttl::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error("a TTL must be positive: at least 1 second")]
    Zero,
    #[error("{seconds}s is more than the maximum of {max}s (366 days)")]
    TooLong { seconds: u64, max: u64 },
    #[error("not a TTL: expected seconds (600) or a duration (90s, 5m, 8h)")]
    Syntax,
    #[error("a TTL must be positive, not negative")]
    Negative,
}

impl Ttl {
    /// Nothing we issue lives longer than a year: longer lifetimes defeat rotation.
    pub const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

    pub fn from_secs(seconds: u64) -> Result<Self, TtlError> {
        Self::try_from(Duration::from_secs(seconds))
    }

    /// A TTL from a constant number of seconds, clamped into [1 s, MAX]: for defaults, which
    /// need no error path.
    pub fn clamped(seconds: u64) -> Self {
        Ttl(Duration::from_secs(seconds.clamp(1, Self::MAX.as_secs())))
    }

    pub fn as_duration(self) -> Duration {
        self.0
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// Seconds as carried in protos, where 0 means "use the default".
    pub fn from_proto_secs(seconds: i64) -> Result<Option<Self>, TtlError> {
        match seconds {
            0 => Ok(None),
            s if s < 0 => Err(TtlError::Negative),
            s => Self::from_secs(s.unsigned_abs()).map(Some),
        }
    }
}

impl TryFrom<Duration> for Ttl {
    type Error = TtlError;

    fn try_from(d: Duration) -> Result<Self, TtlError> {
        if d.as_secs() == 0 {
            return Err(TtlError::Zero);
        }
        if d > Self::MAX {
            return Err(TtlError::TooLong {
                seconds: d.as_secs(),
                max: Self::MAX.as_secs(),
            });
        }
        // Whole seconds only: certificates and JWT `exp` have one-second resolution.
        Ok(Ttl(Duration::from_secs(d.as_secs())))
    }
}

impl FromStr for Ttl {
    type Err = TtlError;

    fn from_str(s: &str) -> Result<Self, TtlError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('-') {
            if !rest.is_empty() {
                return Err(TtlError::Negative);
            }
        }
        if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
            let seconds: u64 = s.parse().map_err(|_| TtlError::TooLong {
                seconds: u64::MAX,
                max: Self::MAX.as_secs(),
            })?;
            return Self::from_secs(seconds);
        }
        // humantime's own messages ("expected number at 0") describe its parser, not the
        // value: the forms accepted say more.
        let d = humantime::parse_duration(s).map_err(|_| TtlError::Syntax)?;
        Self::try_from(d)
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_durations() {
        assert_eq!("600".parse::<Ttl>().unwrap().as_secs(), 600);
        assert_eq!("90s".parse::<Ttl>().unwrap().as_secs(), 90);
        assert_eq!("5m".parse::<Ttl>().unwrap().as_secs(), 300);
        assert_eq!("8h".parse::<Ttl>().unwrap().as_secs(), 8 * 3600);
    }

    #[test]
    fn refuses_zero_negative_absurd_and_garbage() {
        assert_eq!("0".parse::<Ttl>(), Err(TtlError::Zero));
        assert_eq!("0s".parse::<Ttl>(), Err(TtlError::Zero));
        assert_eq!("-5".parse::<Ttl>(), Err(TtlError::Negative));
        assert!(matches!(
            "400d".parse::<Ttl>(),
            Err(TtlError::TooLong { .. })
        ));
        assert!(matches!(
            "99999999999999999999999".parse::<Ttl>(),
            Err(TtlError::TooLong { .. })
        ));
        assert_eq!("soon".parse::<Ttl>(), Err(TtlError::Syntax));
        assert_eq!("".parse::<Ttl>(), Err(TtlError::Syntax));
        assert_eq!("-5m".parse::<Ttl>(), Err(TtlError::Negative));
    }

    #[test]
    fn clamped_stays_in_range() {
        assert_eq!(Ttl::clamped(0).as_secs(), 1);
        assert_eq!(Ttl::clamped(300).as_secs(), 300);
        assert_eq!(Ttl::clamped(u64::MAX).as_duration(), Ttl::MAX);
    }

    #[test]
    fn proto_zero_means_default() {
        assert_eq!(Ttl::from_proto_secs(0), Ok(None));
        assert_eq!(Ttl::from_proto_secs(-1), Err(TtlError::Negative));
        assert_eq!(Ttl::from_proto_secs(60).unwrap().unwrap().as_secs(), 60);
    }
}
