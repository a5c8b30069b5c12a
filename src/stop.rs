//! Stop strings: end generation when the text contains one, without ever streaming any
//! part of it.

/// Filters streamed text against stop strings. Text that could be the start of a stop
/// string is held back until the following text shows it is not one.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

/// What [`StopStrings::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet: stream this text.
    Continue(String),
    /// A stop string was found: stream this text (everything before it) and stop.
    Stop(String),
}

impl StopStrings {
    /// A filter for `stops`; empty strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds newly generated text.
    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Continue(text.to_string());
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let before = self.held[..at].to_string();
            self.held.clear();
            return StopScan::Stop(before);
        }
        // Hold back the longest tail that is the beginning of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        StopScan::Continue(out)
    }

    /// Releases the held-back text (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(stops: &[&str]) -> StopStrings {
        StopStrings::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn text_without_a_stop_string_passes_through() {
        let mut f = filter(&["###"]);
        assert_eq!(f.push("hello "), StopScan::Continue("hello ".into()));
        assert_eq!(f.push("world"), StopScan::Continue("world".into()));
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_streamed() {
        let mut f = filter(&["User:"]);
        assert_eq!(f.push("Sure. Us"), StopScan::Continue("Sure. ".into()));
        assert_eq!(f.push("er"), StopScan::Continue("".into()));
        assert_eq!(f.push(": hi"), StopScan::Stop("".into()));
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_be_a_stop() {
        let mut f = filter(&["User:"]);
        assert_eq!(f.push("a Us"), StopScan::Continue("a ".into()));
        assert_eq!(f.push("ed"), StopScan::Continue("Used".into()));
        assert_eq!(f.push(" Use"), StopScan::Continue(" ".into()));
        assert_eq!(f.flush(), "Use");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut f = filter(&["END", "\n\n"]);
        assert_eq!(f.push("ab\n\ncdEND"), StopScan::Stop("ab".into()));
    }

    #[test]
    fn multibyte_text_is_split_only_at_character_boundaries() {
        let mut f = filter(&["東京!"]);
        assert_eq!(f.push("行く東"), StopScan::Continue("行く".into()));
        assert_eq!(f.push("京"), StopScan::Continue("".into()));
        assert_eq!(f.push("?"), StopScan::Continue("東京?".into()));
    }
}
