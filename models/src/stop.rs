//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until it is known not to be, so a client never sees part of a stop sequence.

/// Scans streamed text for stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// The result of feeding text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// Text safe to emit; generation goes on.
    Continue(String),
    /// A stop string matched: emit this text, then stop.
    Stopped(String),
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub fn feed(&mut self, text: &str) -> StopScan {
        self.pending.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan::Stopped(out);
        }
        let keep = self.partial_suffix_len();
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan::Continue(out)
    }

    /// Whatever is held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of some stop string.
    fn partial_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let max = s.len().saturating_sub(1).min(p.len());
            for len in (best + 1..=max).rev() {
                let start = p.len() - len;
                if p.is_char_boundary(start) && s.as_bytes().starts_with(&p.as_bytes()[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn holds_back_partial_match_then_releases() {
        let mut m = StopMatcher::new(&stops(&["\nUser:"]));
        assert_eq!(m.feed("Hello"), StopScan::Continue("Hello".into()));
        assert_eq!(m.feed(" world\nUs"), StopScan::Continue(" world".into()));
        assert_eq!(m.feed("ually"), StopScan::Continue("\nUsually".into()));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stops_across_pieces_and_drops_the_stop_text() {
        let mut m = StopMatcher::new(&stops(&["END", "\n\n"]));
        assert_eq!(m.feed("abc E"), StopScan::Continue("abc ".into()));
        assert_eq!(m.feed("NDtail"), StopScan::Stopped("".into()));
        let mut m = StopMatcher::new(&stops(&["END", "\n\n"]));
        assert_eq!(m.feed("x\n\ny END"), StopScan::Stopped("x".into()));
    }

    #[test]
    fn multibyte_text_never_split() {
        let mut m = StopMatcher::new(&stops(&["é!"]));
        assert_eq!(m.feed("café"), StopScan::Continue("caf".into()));
        assert_eq!(m.feed("?"), StopScan::Continue("é?".into()));
        let mut m = StopMatcher::new(&stops(&[""]));
        assert_eq!(m.feed("🚀"), StopScan::Continue("🚀".into()));
    }
}
