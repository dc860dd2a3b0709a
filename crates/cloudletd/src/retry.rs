//! Retrying with exponential backoff: the one way the daemon waits between
//! attempts of a call to a peer.

use std::time::Duration;

/// Delays that double from `first` up to `max`, for at most `attempts`
/// waits (`None`: no limit; the caller stops on its own deadline).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    left: Option<u32>,
    /// Waits done so far.
    pub done: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration, attempts: Option<u32>) -> Self {
        Self {
            next: first,
            max,
            left: attempts,
            done: 0,
        }
    }

    /// The next delay, or `None` once the attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if let Some(left) = &mut self.left {
            if *left == 0 {
                return None;
            }
            *left -= 1;
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        self.done += 1;
        Some(d)
    }

    /// Sleep the next delay; `false` (at once) once the attempts are used up.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stop_after_the_attempts() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(3200), Some(7));
        let got: Vec<_> = std::iter::from_fn(|| b.next_delay()).collect();
        assert_eq!(
            got,
            [200, 400, 800, 1600, 3200, 3200, 3200].map(ms).to_vec()
        );
        assert_eq!(b.done, 7);
        let mut forever = Backoff::new(ms(1), ms(2), None);
        assert!((0..100).all(|_| forever.next_delay().is_some()));
    }
}
