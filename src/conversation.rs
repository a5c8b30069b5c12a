//! A multi-turn chat on a [`Runner`]: each turn feeds only the text the chat template
//! adds for the new messages, so earlier turns stay in the KV cache.

use std::ops::ControlFlow;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::runner::{Runner, TokenPiece};
use crate::session::Session;
use crate::stats::{Stats, StopReason};

/// A multi-turn chat on a [`Runner`] that keeps earlier turns in the KV cache.
///
/// Each [`send`](Self::send) renders the whole conversation with the template, checks
/// that the text fed so far is a prefix of it, and feeds only the rest (the new user
/// message and the assistant header). If the template renders earlier turns differently
/// once a new message is added (some templates do), the conversation is fed again from
/// the first token that differs (prefix reuse; with
/// [`set_reuse_prefix(false)`](Self::set_reuse_prefix), from the start);
/// [`refed_turns`](Self::refed_turns) counts how often that happened.
///
/// It runs on a [`Runner`] (its own conversation) or on a [`Session`]: see [`ChatTarget`].
/// [`to_json`](Self::to_json) and [`from_json`](Self::from_json) carry its messages
/// across processes, for example as the user data of a saved session state.
///
/// The conversation owns no runner: pass the same runner to every call, and do not
/// generate on it in between, or the positions it records no longer match.
///
/// A chat with rewind (a compact template: the test model's context is 128 tokens):
///
/// ```
/// use std::ops::ControlFlow;
/// use etllm::{ChatTemplate, Conversation, GenerationConfig, Runner, RunnerOptions};
///
/// let mut runner = Runner::open(
///     "tests/fixtures/dyn_xnnpack/model.pte",
///     "tests/fixtures/tokenizer.json",
///     RunnerOptions::default(),
/// )?;
/// let template = ChatTemplate::new(
///     "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
///      {% if add_generation_prompt %}<assistant>{% endif %}",
/// )?;
/// let mut chat = Conversation::new(template);
/// let config = GenerationConfig { max_new_tokens: 6, temperature: 0.0, ignore_eos: true, ..Default::default() };
/// let print = |piece: etllm::TokenPiece<'_>| { print!("{}", piece.text); ControlFlow::Continue(()) };
///
/// chat.send(&mut runner, "Once upon", &config, print)?;
/// let before = runner.position();
/// let (reply, _stats) = chat.send(&mut runner, "a time", &config, print)?;
/// assert_eq!(chat.turns(), 2);
///
/// assert!(chat.rewind(&mut runner)?); // drops the last turn and its KV-cache entries
/// assert_eq!((chat.turns(), runner.position()), (1, before));
/// let (again, _) = chat.send(&mut runner, "a time", &config, print)?;
/// assert_eq!(again, reply); // greedy: the same reply
/// # Ok::<(), etllm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Conversation {
    /// Feed only what differs when the template re-renders earlier turns.
    reuse_prefix: bool,
    template: ChatTemplate,
    messages: Vec<ChatMessage>,
    /// The rendered text fed to the runner so far.
    fed: String,
    /// Per turn: the runner position, the message count and the fed text before it.
    turns: Vec<(usize, usize, String)>,
    refed: usize,
}

impl Conversation {
    /// An empty conversation that renders with `template`.
    pub fn new(template: ChatTemplate) -> Self {
        Self {
            reuse_prefix: true,
            template,
            messages: Vec::new(),
            fed: String::new(),
            turns: Vec::new(),
            refed: 0,
        }
    }

    /// The messages so far, the assistant's replies included.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// The number of completed turns (user message plus reply).
    pub fn turns(&self) -> usize {
        self.turns.len()
    }

    /// How many turns had to re-feed the whole conversation because the template did not
    /// extend the earlier text.
    pub fn refed_turns(&self) -> usize {
        self.refed
    }

    /// Adds a system message; only allowed before the first turn.
    pub fn set_system(&mut self, content: impl Into<String>) -> Result<()> {
        if !self.turns.is_empty() {
            return Err(Error::InvalidArgument(
                "the system message must come before the first turn".into(),
            ));
        }
        self.messages.retain(|m| m.role != "system");
        self.messages.insert(0, ChatMessage::system(content));
        Ok(())
    }

    /// Sends a user message and generates the reply, streaming it to `on_token`. The
    /// reply is added to the conversation (as the text streamed). `config.num_bos`,
    /// `num_eos` and `echo` are ignored: the template decides where special tokens go, and
    /// only the reply is streamed. On error, the
    /// conversation and the runner are left as they were before the call.
    pub fn send(
        &mut self,
        target: &mut impl ChatTarget,
        user: &str,
        config: &GenerationConfig,
        mut on_token: impl FnMut(TokenPiece<'_>) -> ControlFlow<()>,
    ) -> Result<(String, Stats)> {
        let first = self.fed.is_empty();
        let mut messages = self.messages.clone();
        messages.push(ChatMessage::user(user));
        let full = self.template.apply(&messages, true)?;
        // Extend the fed text when the template kept it; else start over, keeping the
        // tokens the session already holds that the new text starts with (prefix reuse).
        let extend = !first && full.starts_with(&self.fed);
        let reuse = !extend && self.reuse_prefix;
        let config = GenerationConfig {
            num_bos: 0,
            num_eos: 0,
            echo: false,
            reuse_prefix: reuse,
            ..config.clone()
        };
        let runner = target.session()?;
        let saved = (runner.position(), self.messages.len(), self.fed.clone());
        if !extend && !reuse {
            runner.reset()?;
        }
        let new_text = if extend {
            &full[self.fed.len()..]
        } else {
            &full[..]
        };
        let mut reply = String::new();
        let result = runner.generate(
            new_text,
            &config,
            |piece| {
                reply.push_str(piece.text);
                on_token(piece)
            },
            |_| {},
        );
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                if !extend {
                    // The runner was reset: earlier turns must be fed again next time.
                    self.fed.clear();
                    self.turns.clear();
                }
                // Otherwise generate rolled the runner back to where this turn started.
                return Err(e);
            }
        };
        if extend {
            self.turns.push(saved);
        } else {
            if !first {
                self.refed += 1;
            }
            // Earlier turns' positions are gone with the reset.
            self.turns.clear();
            self.turns.push((0, saved.1, String::new()));
        }
        messages.push(ChatMessage::assistant(reply.clone()));
        let history = self.template.apply(&messages, false)?;
        let spoken = full + &reply;
        // After an end-of-turn token (fed at the start of the next call) the model has seen
        // this turn as the template writes it in history. After any other stop it has seen
        // the prompt and the reply, and the template's end of the turn is still to come.
        self.fed = if stats.stop_reason == StopReason::Eos || !history.starts_with(&spoken) {
            history
        } else {
            spoken
        };
        self.messages = messages;
        Ok((reply, stats))
    }

    /// Drops the last turn (the user message and its reply) and rewinds the runner to
    /// where that turn started, so that the next [`send`](Self::send) continues from
    /// there. Returns false when there is no turn to drop.
    pub fn rewind(&mut self, target: &mut impl ChatTarget) -> Result<bool> {
        let Some((pos, n_messages, fed)) = self.turns.last().cloned() else {
            return Ok(false);
        };
        let runner = target.session()?;
        if pos == 0 {
            runner.reset()?;
        } else {
            runner.rewind(pos)?;
        }
        self.turns.pop();
        self.messages.truncate(n_messages);
        self.fed = fed;
        Ok(true)
    }

    /// Forgets every turn (a system message stays) and resets the runner.
    pub fn reset(&mut self, target: &mut impl ChatTarget) -> Result<()> {
        target.session()?.reset()?;
        self.messages.retain(|m| m.role == "system");
        self.turns.clear();
        self.fed.clear();
        Ok(())
    }
}

/// What a [`Conversation`] runs on: a [`Runner`]'s own conversation or a [`Session`].
pub trait ChatTarget {
    /// The session to generate on (a runner loads first if needed).
    fn session(&mut self) -> Result<&mut Session>;
}

impl ChatTarget for Runner {
    fn session(&mut self) -> Result<&mut Session> {
        self.as_session()
    }
}

impl ChatTarget for Session {
    fn session(&mut self) -> Result<&mut Session> {
        Ok(self)
    }
}

/// The part of a [`Conversation`] that [`Conversation::to_json`] writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    messages: Vec<ChatMessage>,
    fed: String,
    turns: Vec<(usize, usize, String)>,
    refed: usize,
}

impl Conversation {
    /// Whether a turn whose template re-renders earlier turns keeps the tokens that did
    /// not change (true, the default) or feeds the conversation again from the start.
    pub fn set_reuse_prefix(&mut self, reuse: bool) {
        self.reuse_prefix = reuse;
    }

    /// The conversation as JSON (messages, the text fed and the turns' positions), for
    /// [`from_json`](Self::from_json): with a session state saved at the same moment (as
    /// its user data), a chat resumes in another process exactly where it was.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Saved {
            messages: self.messages.clone(),
            fed: self.fed.clone(),
            turns: self.turns.clone(),
            refed: self.refed,
        })
        .expect("plain data serialises")
    }

    /// A conversation from [`to_json`](Self::to_json)'s text, rendered with `template`.
    pub fn from_json(template: ChatTemplate, json: &str) -> Result<Self> {
        let saved: Saved = serde_json::from_str(json)
            .map_err(|e| Error::InvalidState(format!("its chat is not valid: {e}")))?;
        Ok(Self {
            reuse_prefix: true,
            template,
            messages: saved.messages,
            fed: saved.fed,
            turns: saved.turns,
            refed: saved.refed,
        })
    }
}
