//! Translation of llama.cpp GBNF grammars into llguidance's Lark dialect.
//!
//! [`gbnf_to_lark`] accepts the GBNF that llama.cpp's `llama_grammar_parser` accepts and
//! produces a Lark grammar that llguidance compiles, matching exactly the same strings.
//!
//! # What "the same GBNF" means
//!
//! The parser mirrors llama.cpp's (`src/llama-grammar.cpp`) rather than its README:
//!
//! - rule names are `[a-zA-Z0-9-]+` (no `_`, whatever the README says); a later definition
//!   of a rule replaces an earlier one; every referenced rule must be defined and a `root`
//!   rule must exist;
//! - a rule ends at a newline outside parentheses, except right after `|`; `#` starts a
//!   comment; `::=` may be followed by a newline;
//! - literals `"..."`, classes `[...]` / `[^...]` with ranges, `.`, groups, and the escapes
//!   `\xHH \uHHHH \UHHHHHHHH \t \r \n \\ \" \[ \] \-`; `\xHH` is the code point U+00HH
//!   (GBNF terminals are code points, not bytes);
//! - an empty class `[]` (or `[^]`) matches the empty string, as in llama.cpp;
//! - repetition `* + ?`, `{m}`, `{m,}`, `{m,n}` apply to the previous symbol (a whole
//!   literal, class, reference or group); a repetition after nothing, after `""` or after
//!   `x{0}` is an error; with llama.cpp's `MAX_REPETITION_THRESHOLD` (2000), `m` above
//!   2000 is an error, `n` above 2000 means "no upper bound", and a repetition for which
//!   llama.cpp would generate 2000 helper rules or more (nested repetitions multiply) is
//!   an error; `{m,n}` with `m > n` is refused (llama.cpp would loop until out of memory);
//! - token references `<[id]>`, `!<[id]>` and `<name>` become llguidance's special-token
//!   syntax `<[id]>`, `<[^id]>` and `<name>`; `!<name>` is refused because llguidance can
//!   only negate token ids, and so is a `<name>` that llguidance's syntax cannot hold
//!   (empty, or with whitespace or `<`). Two differences remain, because the translation
//!   does not know the tokenizer: llguidance resolves `<name>` among the tokenizer's
//!   special tokens only (llama.cpp tokenizes the text and accepts any single token), and
//!   llguidance's `<[^id]>` also matches end-of-generation tokens, which llama.cpp's
//!   `!<[id]>` never does (a caller that knows them can add them: `<[^id,eos]>`);
//! - grammars that llama.cpp rejects as left-recursive are refused; the check reproduces
//!   llama.cpp's, including its treatment of the helper rules it generates for groups and
//!   repetitions (so `x?*` is refused but `(x?)*` is not).
//!
//! A NUL character anywhere in the grammar is refused (llama.cpp would silently stop
//! reading there). Character values that are not Unicode scalar values (surrogates, or
//! above U+10FFFF) can never be produced by UTF-8 text, so they match nothing. The code
//! point U+0000 is an ordinary character here; llama.cpp's engine cannot match it in
//! practice, because it works on NUL-terminated strings.
//!
//! # Translation strategy
//!
//! GBNF has no lexer: every rule is matched character by character. llguidance's Lark has
//! one: terminals (UPPERCASE names, string literals, `/regex/`) are lexemes, matched by a
//! lexer that runs the regexes of all the lexemes the Earley parser allows at a position
//! in parallel, greedily. A lexeme ends only when the next byte cannot extend *any* of
//! them (and then it is every allowed lexeme that matches the text read so far); there is
//! no backtracking into a shorter match. Translating a GBNF rule into a terminal can
//! therefore lose strings: with `a ::= [a-z]+` followed by `"x"`, the lexeme would swallow
//! the `x`.
//!
//! A translation whose lexemes all match exactly one character is always exact: no
//! lexeme can extend another. That is the fallback. To make lexemes longer (which is what
//! makes llguidance fast: it walks the token trie through the lexer DFA and only consults
//! the Earley parser at lexeme boundaries), a regular part of the grammar (a rule or
//! sub-expression that reaches no recursion and no token) becomes one terminal when it is
//! *provably safe*:
//!
//! For a lexeme `B` that can match more than one character, every lexeme occurrence `A`
//! that can be allowed at the same position as `B` (including `B` itself) is checked:
//! there must be no string `w` that `A` matches and character `c` that can follow that
//! occurrence of `A` in the grammar such that `w` followed by the first byte of `c` is a
//! prefix of something `B` matches. When this holds for all such pairs, the greedy lexer
//! always stops exactly where the GBNF parse has a lexeme boundary: it cannot stop earlier
//! (the right lexeme is still alive), and it cannot read further (the next byte kills all
//! of them). The check is done on small automata (repetitions with large counts are
//! over-approximated by `*`/`+`, which only makes it stricter); "can follow" uses FOLLOW
//! sets of the character-level grammar, and "can be allowed at the same position" uses the
//! lexemes that can precede each occurrence (two lexemes are co-allowed only if some
//! lexemes before them can match the same text). A lexeme that fails is split into its
//! parts (a rule becomes a Lark rule, a group its alternatives, a literal its characters),
//! and the check is repeated until nothing fails. If the analysis exceeds its budget, the
//! translation falls back to one-character lexemes everywhere.
//!
//! The rest maps directly: GBNF rules that are not terminals become Lark rules, groups and
//! repetitions the same Lark operators (`x{m,n}` and friends), and the start rule is
//! `start: root`. Parts that can only match the empty string are dropped, and so are
//! alternatives that can match nothing. No `%ignore` is emitted, so nothing is skipped
//! between lexemes.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// Where and why a GBNF grammar was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GbnfError {
    /// 1-based line of the offending construct.
    pub line: usize,
    /// 1-based column (in characters) of the offending construct.
    pub column: usize,
    /// What is wrong, naming the construct.
    pub message: String,
}

impl fmt::Display for GbnfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for GbnfError {}

/// Translates a llama.cpp GBNF grammar into llguidance's Lark dialect.
///
/// The result accepts exactly the strings the GBNF grammar accepts from its `root` rule;
/// see the [module documentation](self) for the dialect details and the strategy.
///
/// ```
/// use etllm::grammar::gbnf::gbnf_to_lark;
///
/// let lark = gbnf_to_lark("root ::= \"yes\" | \"no\"").unwrap();
/// assert!(lark.contains("start:"));
///
/// let err = gbnf_to_lark("root ::= answer\n").unwrap_err();
/// assert_eq!(err.to_string(), "line 1, column 10: undefined rule `answer`");
/// ```
pub fn gbnf_to_lark(gbnf: &str) -> Result<String, GbnfError> {
    let ast = Parser::parse(gbnf)?;
    check_left_recursion(&ast, gbnf)?;
    let graph = Graph::build(&ast);
    let analysis = Analysis::new(&graph);
    let selection = select_lexemes(&graph, &analysis, WORK_BUDGET);
    Ok(Emitter::new(&ast, &graph, &analysis, &selection).emit())
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

/// llama.cpp's `MAX_REPETITION_THRESHOLD`.
const MAX_REPETITION: u64 = 2000;
/// Groups and stacked repetitions nested deeper than this are refused (llama.cpp would
/// recurse without bound).
const MAX_NESTING: usize = 100;
/// Depth of a terminal's expression tree, with the referenced rules inlined, above which
/// it is not made one terminal (the checks recurse through it).
const MAX_UNIT_DEPTH: usize = 400;
/// States of the automaton built to check one lexeme.
const MAX_NFA_STATES: usize = 4000;
/// Total analysis work (automaton steps, set operations) before falling back to
/// one-character lexemes.
const WORK_BUDGET: u64 = 20_000_000;
/// Above this many lexeme occurrences, co-allowed lexemes are approximated by "share a
/// first byte" instead of being computed.
const MAX_PRECISE_LEXEMES: usize = 2000;
/// Rounds of splitting lexemes before falling back to one-character lexemes.
const MAX_ROUNDS: usize = 100;
/// Rounds in which a failing lexeme is split one level only.
const SPLIT_LEVEL_ROUNDS: usize = 6;

const MAX_CHAR: u32 = 0x10FFFF;

// ---------------------------------------------------------------------------------------
// Character sets (Unicode scalar values)
// ---------------------------------------------------------------------------------------

/// A set of Unicode scalar values: sorted, disjoint, non-adjacent ranges, without
/// surrogates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CharSet {
    ranges: Vec<(u32, u32)>,
}

impl CharSet {
    fn single(c: u32) -> CharSet {
        CharSet::from_ranges(vec![(c, c)])
    }

    fn all() -> CharSet {
        CharSet {
            ranges: vec![(0, 0xD7FF), (0xE000, MAX_CHAR)],
        }
    }

    /// Normalizes arbitrary code point ranges; ranges with `lo > hi` are empty (as in
    /// llama.cpp, where they match nothing).
    fn from_ranges(raw: Vec<(u32, u32)>) -> CharSet {
        let mut v = Vec::with_capacity(raw.len() + 1);
        for (lo, hi) in raw {
            let hi = hi.min(MAX_CHAR);
            if lo > hi {
                continue;
            }
            if lo <= 0xD7FF {
                v.push((lo, hi.min(0xD7FF)));
            }
            if hi >= 0xE000 {
                v.push((lo.max(0xE000), hi));
            }
        }
        v.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            if let Some(last) = out.last_mut() {
                if lo <= last.1.saturating_add(1) {
                    last.1 = last.1.max(hi);
                    continue;
                }
            }
            out.push((lo, hi));
        }
        CharSet { ranges: out }
    }

    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    fn as_single(&self) -> Option<u32> {
        match self.ranges.as_slice() {
            [(a, b)] if a == b => Some(*a),
            _ => None,
        }
    }

    /// The complement among Unicode scalar values.
    fn complement(&self) -> CharSet {
        let mut out = Vec::new();
        let mut next = 0u32;
        for &(lo, hi) in &self.ranges {
            if lo > next {
                out.push((next, lo - 1));
            }
            next = hi + 1;
        }
        if next <= MAX_CHAR {
            out.push((next, MAX_CHAR));
        }
        CharSet::from_ranges(out)
    }

    fn intersects(&self, other: &CharSet) -> bool {
        let (a, b) = (&self.ranges, &other.ranges);
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            if a[i].1 < b[j].0 {
                i += 1;
            } else if b[j].1 < a[i].0 {
                j += 1;
            } else {
                return true;
            }
        }
        false
    }

    /// Adds `other`; returns whether the set grew.
    fn join(&mut self, other: &CharSet) -> bool {
        if other.ranges.is_empty() {
            return false;
        }
        let mut all = self.ranges.clone();
        all.extend_from_slice(&other.ranges);
        let merged = CharSet::from_ranges(all);
        if merged != *self {
            *self = merged;
            true
        } else {
            false
        }
    }

    /// The first bytes of the UTF-8 encodings of the members.
    fn first_bytes(&self) -> ByteSet {
        let mut set = ByteSet::default();
        const SEGMENTS: [(u32, u32); 4] = [
            (0, 0x7F),
            (0x80, 0x7FF),
            (0x800, 0xFFFF),
            (0x10000, MAX_CHAR),
        ];
        fn first_byte(c: u32) -> u8 {
            match c {
                0..=0x7F => c as u8,
                0x80..=0x7FF => 0xC0 | (c >> 6) as u8,
                0x800..=0xFFFF => 0xE0 | (c >> 12) as u8,
                _ => 0xF0 | (c >> 18) as u8,
            }
        }
        for &(lo, hi) in &self.ranges {
            for (slo, shi) in SEGMENTS {
                let (a, b) = (lo.max(slo), hi.min(shi));
                if a <= b {
                    for byte in first_byte(a)..=first_byte(b) {
                        set.insert(byte);
                    }
                }
            }
        }
        set
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[(b >> 6) as usize] |= 1 << (b & 63);
    }

    fn intersects(&self, other: &ByteSet) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }
}

/// A fixed-size bit set (lexeme occurrences).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn intersects(&self, other: &BitSet) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

/// A join semilattice for the fixpoint computations below.
trait Lattice: Clone {
    /// Adds `other`; returns whether `self` grew.
    fn join_from(&mut self, other: &Self) -> bool;
}

impl Lattice for CharSet {
    fn join_from(&mut self, other: &Self) -> bool {
        self.join(other)
    }
}

impl Lattice for BitSet {
    fn join_from(&mut self, other: &Self) -> bool {
        let mut grew = false;
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            let n = *a | *b;
            grew |= n != *a;
            *a = n;
        }
        grew
    }
}

// ---------------------------------------------------------------------------------------
// Parsing (a mirror of llama.cpp's llama_grammar_parser)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenSpec {
    Id(u32),
    /// The whole `<...>` text.
    Name(String),
}

#[derive(Debug, Clone)]
enum Item {
    /// A literal string: its code points, in order (possibly none).
    Lit(Vec<u32>),
    /// A non-empty character class: one character of the set.
    Class(CharSet),
    /// `.`
    Any,
    Token {
        spec: TokenSpec,
        negated: bool,
    },
    Ref(usize),
    Group(Vec<Seq>),
    Repeat {
        item: Box<Item>,
        min: u32,
        max: Option<u32>,
    },
}

type Seq = Vec<Item>;

#[derive(Debug)]
struct AstRule {
    name: String,
    body: Option<Vec<Seq>>,
    /// Byte offset of the (last) definition.
    def_pos: usize,
    /// Byte offset of the first reference.
    first_ref: Option<usize>,
}

#[derive(Debug)]
struct Ast {
    rules: Vec<AstRule>,
    root: usize,
    /// Bodies replaced by a later definition of the same rule: llama.cpp keeps the helper
    /// rules generated for their groups and repetitions, which its left-recursion check
    /// still visits.
    orphans: Vec<(usize, Vec<Seq>)>,
}

fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let mut line = 1;
    let mut col = 1;
    let mut prev_cr = false;
    for c in text[..pos].chars() {
        match c {
            '\n' if prev_cr => {}
            '\n' | '\r' => {
                line += 1;
                col = 1;
            }
            _ => col += 1,
        }
        prev_cr = c == '\r';
    }
    (line, col)
}

fn error_at(text: &str, pos: usize, message: impl Into<String>) -> GbnfError {
    let (line, column) = line_col(text, pos);
    GbnfError {
        line,
        column,
        message: message.into(),
    }
}

fn is_word_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

fn describe_char(text: &str, pos: usize) -> String {
    match text.get(pos..).and_then(|s| s.chars().next()) {
        None => "the end of the grammar".to_string(),
        Some('\n') | Some('\r') => "a newline".to_string(),
        Some(c) => format!("`{}`", c.escape_debug()),
    }
}

/// Nesting depth of an item (groups and repetitions), computed on already-bounded items.
fn item_depth(item: &Item) -> usize {
    match item {
        Item::Group(alts) => 1 + alts.iter().flatten().map(item_depth).max().unwrap_or(0),
        Item::Repeat { item, .. } => 1 + item_depth(item),
        _ => 0,
    }
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    rules: Vec<AstRule>,
    names: HashMap<String, usize>,
    orphans: Vec<(usize, Vec<Seq>)>,
    /// llama.cpp's `symbol_ids.size()`: rule names plus the ids it generates for groups
    /// and repetitions (its nested-repetition limit counts them).
    symbols: u64,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn parse(text: &'a str) -> Result<Ast, GbnfError> {
        if let Some(nul) = text.find('\0') {
            return Err(error_at(
                text,
                nul,
                "NUL character in the grammar (llama.cpp would ignore everything after it)",
            ));
        }
        let mut p = Parser {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            rules: Vec::new(),
            names: HashMap::new(),
            orphans: Vec::new(),
            symbols: 0,
            depth: 0,
        };
        p.space(true);
        while !p.at_end() {
            p.rule()?;
        }
        if p.rules.iter().all(|r| r.body.is_none()) {
            return Err(error_at(text, 0, "empty grammar: no rules"));
        }
        let mut undefined: Vec<&AstRule> = p.rules.iter().filter(|r| r.body.is_none()).collect();
        undefined.sort_by_key(|r| r.first_ref);
        if let Some(r) = undefined.first() {
            return Err(error_at(
                text,
                r.first_ref.unwrap_or(0),
                format!("undefined rule `{}`", r.name),
            ));
        }
        let Some(&root) = p.names.get("root") else {
            return Err(error_at(
                text,
                0,
                "no `root` rule: GBNF grammars start at the rule named `root`",
            ));
        };
        Ok(Ast {
            rules: p.rules,
            root,
            orphans: p.orphans,
        })
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn peek(&self) -> u8 {
        self.peek_at(0)
    }

    fn peek_at(&self, k: usize) -> u8 {
        self.bytes.get(self.pos + k).copied().unwrap_or(0)
    }

    fn err(&self, pos: usize, message: impl Into<String>) -> GbnfError {
        error_at(self.text, pos, message)
    }

    /// llama.cpp's `parse_space`: blanks and comments, and newlines if `newline_ok`.
    fn space(&mut self, newline_ok: bool) {
        loop {
            match self.peek() {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newline_ok => self.pos += 1,
                b'#' => {
                    while !self.at_end() && !matches!(self.peek(), b'\r' | b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> &'a str {
        let start = self.pos;
        while is_word_char(self.peek()) {
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn symbol(&mut self, name: &str) -> usize {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.rules.len();
        self.rules.push(AstRule {
            name: name.to_string(),
            body: None,
            def_pos: 0,
            first_ref: None,
        });
        self.names.insert(name.to_string(), id);
        self.symbols += 1;
        id
    }

    /// A message for a character that cannot continue the construct being parsed.
    fn unexpected(&self, pos: usize, context: &str) -> GbnfError {
        let rest = &self.text[pos.min(self.text.len())..];
        let message = if rest.starts_with('_') {
            "`_` is not allowed in rule names (llama.cpp accepts letters, digits and `-`)"
                .to_string()
        } else if rest.starts_with("::=") {
            "unexpected `::=`: each rule definition must start on a new line".to_string()
        } else if rest.starts_with(')') {
            "unbalanced `)`".to_string()
        } else {
            format!("unexpected {} {context}", describe_char(self.text, pos))
        };
        self.err(pos, message)
    }

    fn rule(&mut self) -> Result<(), GbnfError> {
        let start = self.pos;
        let name = self.name();
        if name.is_empty() {
            let message = match self.peek() {
                b'|' => "a line cannot start with `|`: outside parentheses a newline ends the \
                         rule, so put the `|` at the end of the previous line"
                    .to_string(),
                b'_' => "`_` is not allowed in rule names (llama.cpp accepts letters, digits \
                         and `-`)"
                    .to_string(),
                _ => format!(
                    "expected a rule name, found {}",
                    describe_char(self.text, self.pos)
                ),
            };
            return Err(self.err(start, message));
        }
        self.space(false);
        if !self.text[self.pos..].starts_with("::=") {
            if self.peek() == b'_' {
                return Err(self.unexpected(self.pos, ""));
            }
            return Err(self.err(
                self.pos,
                format!(
                    "expected `::=` after the rule name `{name}`, found {}",
                    describe_char(self.text, self.pos)
                ),
            ));
        }
        let id = self.symbol(name);
        self.pos += 3;
        self.space(true);
        let body = self.alternates(false)?;
        match self.peek() {
            b'\r' => self.pos += if self.peek_at(1) == b'\n' { 2 } else { 1 },
            b'\n' => self.pos += 1,
            _ if self.at_end() => {}
            _ => return Err(self.unexpected(self.pos, &format!("in the rule `{name}`"))),
        }
        let rule = &mut self.rules[id];
        if let Some(old) = rule.body.replace(body) {
            self.orphans.push((id, old));
        }
        rule.def_pos = start;
        self.space(true);
        Ok(())
    }

    fn alternates(&mut self, nested: bool) -> Result<Vec<Seq>, GbnfError> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == b'|' {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, nested: bool) -> Result<Seq, GbnfError> {
        let mut seq: Seq = Vec::new();
        // The last symbol, which a repetition applies to (llama.cpp's `last_sym_start`).
        let mut last: Option<usize> = None;
        // llama.cpp's `n_prev_rules`.
        let mut n_prev: u64 = 1;
        loop {
            let start = self.pos;
            match self.peek() {
                b'"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    while self.peek() != b'"' {
                        if self.at_end() {
                            return Err(self.err(start, "unterminated string literal"));
                        }
                        chars.push(self.char(start, "string literal")?);
                    }
                    self.pos += 1;
                    last = Some(seq.len());
                    seq.push(Item::Lit(chars));
                    n_prev = 1;
                    self.space(nested);
                }
                b'[' => {
                    self.pos += 1;
                    let negated = self.peek() == b'^';
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    while self.peek() != b']' {
                        if self.at_end() {
                            return Err(self.err(start, "unterminated character class"));
                        }
                        let lo = self.char(start, "character class")?;
                        let mut hi = lo;
                        if self.peek() == b'-' && self.peek_at(1) != b']' {
                            if self.pos + 1 >= self.bytes.len() {
                                return Err(self.err(start, "unterminated character class"));
                            }
                            self.pos += 1;
                            hi = self.char(start, "character class")?;
                        }
                        ranges.push((lo, hi));
                    }
                    self.pos += 1;
                    last = Some(seq.len());
                    if ranges.is_empty() {
                        // llama.cpp emits no element for `[]` / `[^]`: it matches "".
                        seq.push(Item::Lit(Vec::new()));
                    } else {
                        let set = CharSet::from_ranges(ranges);
                        seq.push(Item::Class(if negated { set.complement() } else { set }));
                    }
                    n_prev = 1;
                    self.space(nested);
                }
                b'<' | b'!' => {
                    let item = self.token()?;
                    last = Some(seq.len());
                    seq.push(item);
                    n_prev = 1;
                    self.space(nested);
                }
                c if is_word_char(c) => {
                    let name = self.name();
                    let id = self.symbol(name);
                    self.rules[id].first_ref.get_or_insert(start);
                    last = Some(seq.len());
                    seq.push(Item::Ref(id));
                    n_prev = 1;
                    self.space(nested);
                }
                b'(' => {
                    if self.depth >= MAX_NESTING {
                        return Err(self.err(
                            start,
                            format!("groups nested too deeply (more than {MAX_NESTING} levels)"),
                        ));
                    }
                    self.pos += 1;
                    self.space(true);
                    let before = self.symbols;
                    self.symbols += 1; // the group's own generated rule
                    self.depth += 1;
                    let alts = self.alternates(true)?;
                    self.depth -= 1;
                    if self.peek() != b')' {
                        if self.at_end() {
                            return Err(self.err(start, "unclosed `(`: missing `)`"));
                        }
                        let (l, c) = line_col(self.text, start);
                        return Err(self.unexpected(
                            self.pos,
                            &format!("in the group opened at line {l}, column {c} (expected `)`)"),
                        ));
                    }
                    self.pos += 1;
                    n_prev = (self.symbols - before).max(1);
                    let item = Item::Group(alts);
                    if item_depth(&item) > MAX_NESTING {
                        return Err(self.err(
                            start,
                            format!("groups and repetitions nested too deeply (more than {MAX_NESTING} levels)"),
                        ));
                    }
                    last = Some(seq.len());
                    seq.push(item);
                    self.space(nested);
                }
                b'.' => {
                    self.pos += 1;
                    last = Some(seq.len());
                    seq.push(Item::Any);
                    n_prev = 1;
                    self.space(nested);
                }
                b'*' | b'+' | b'?' => {
                    let (min, max) = match self.peek() {
                        b'*' => (0, None),
                        b'+' => (1, None),
                        _ => (0, Some(1)),
                    };
                    let op = self.peek() as char;
                    self.pos += 1;
                    self.space(nested);
                    self.repeat(
                        &mut seq,
                        last,
                        &mut n_prev,
                        min,
                        max,
                        start,
                        &op.to_string(),
                    )?;
                }
                b'{' => {
                    self.pos += 1;
                    self.space(nested);
                    if !self.peek().is_ascii_digit() {
                        return Err(self.err(
                            self.pos,
                            format!(
                                "expected a number in the repetition `{{`, found {}",
                                describe_char(self.text, self.pos)
                            ),
                        ));
                    }
                    let min = self.int(start)?;
                    self.space(nested);
                    let max = match self.peek() {
                        b'}' => {
                            self.pos += 1;
                            Some(min)
                        }
                        b',' => {
                            self.pos += 1;
                            self.space(nested);
                            let max = if self.peek().is_ascii_digit() {
                                Some(self.int(start)?)
                            } else {
                                None
                            };
                            self.space(nested);
                            if self.peek() != b'}' {
                                return Err(self.err(
                                    self.pos,
                                    format!(
                                        "expected `}}` to end the repetition, found {}",
                                        describe_char(self.text, self.pos)
                                    ),
                                ));
                            }
                            self.pos += 1;
                            max
                        }
                        _ => {
                            return Err(self.err(
                                self.pos,
                                format!(
                                    "expected `,` or `}}` in the repetition, found {}",
                                    describe_char(self.text, self.pos)
                                ),
                            ))
                        }
                    };
                    self.space(nested);
                    let shown = match max {
                        Some(n) if n == min => format!("{{{min}}}"),
                        Some(n) => format!("{{{min},{n}}}"),
                        None => format!("{{{min},}}"),
                    };
                    if min > MAX_REPETITION {
                        return Err(self.err(
                            start,
                            format!(
                                "repetition {shown}: the minimum exceeds llama.cpp's limit of {MAX_REPETITION}"
                            ),
                        ));
                    }
                    if let Some(n) = max {
                        if min > n {
                            return Err(self.err(start, format!("repetition {shown} with m > n")));
                        }
                    }
                    // llama.cpp turns a maximum above its threshold into "no maximum".
                    let max = max.filter(|&n| n <= MAX_REPETITION);
                    self.repeat(&mut seq, last, &mut n_prev, min, max, start, &shown)?;
                }
                _ => break,
            }
        }
        Ok(seq)
    }

    #[allow(clippy::too_many_arguments)]
    fn repeat(
        &mut self,
        seq: &mut Seq,
        last: Option<usize>,
        n_prev: &mut u64,
        min: u64,
        max: Option<u64>,
        pos: usize,
        shown: &str,
    ) -> Result<(), GbnfError> {
        let Some(i) = last.filter(|&i| {
            !matches!(&seq[i], Item::Lit(v) if v.is_empty())
                && !matches!(&seq[i], Item::Repeat { max: Some(0), .. })
        }) else {
            return Err(self.err(
                pos,
                format!(
                    "repetition `{shown}` has nothing to repeat (it must follow a non-empty \
                     literal, class, rule reference, group or `.`)"
                ),
            ));
        };
        let total = match max {
            Some(n) if n > 0 => n,
            _ if min > 0 => min,
            _ => 1,
        };
        if *n_prev * total >= MAX_REPETITION {
            return Err(self.err(
                pos,
                format!(
                    "repetition `{shown}` expands to too many rules (llama.cpp limits \
                     nested repetitions to {MAX_REPETITION} generated rules)"
                ),
            ));
        }
        self.symbols += max.map_or(1, |n| n - min);
        *n_prev *= total;
        let inner = std::mem::replace(&mut seq[i], Item::Lit(Vec::new()));
        let item = Item::Repeat {
            item: Box::new(inner),
            min: min as u32,
            max: max.map(|n| n as u32),
        };
        if item_depth(&item) + self.depth > MAX_NESTING {
            return Err(self.err(
                pos,
                format!(
                    "groups and repetitions nested too deeply (more than {MAX_NESTING} levels)"
                ),
            ));
        }
        seq[i] = item;
        Ok(())
    }

    fn int(&mut self, construct_start: usize) -> Result<u64, GbnfError> {
        let start = self.pos;
        while self.peek().is_ascii_digit() {
            self.pos += 1;
        }
        self.text[start..self.pos].parse::<u64>().map_err(|_| {
            self.err(
                construct_start,
                format!("number `{}` is too large", &self.text[start..self.pos]),
            )
        })
    }

    /// llama.cpp's `parse_char`, inside a literal or class that began at `start`.
    fn char(&mut self, start: usize, construct: &str) -> Result<u32, GbnfError> {
        if self.peek() != b'\\' {
            let c = self.text[self.pos..].chars().next().unwrap_or('\0');
            self.pos += c.len_utf8().max(1);
            return Ok(c as u32);
        }
        let esc = self.pos;
        let hex = |p: &mut Self, n: usize, what: &str| -> Result<u32, GbnfError> {
            let digits = &p.text[(p.pos + 2).min(p.text.len())..];
            let got = digits
                .bytes()
                .take(n)
                .take_while(u8::is_ascii_hexdigit)
                .count();
            if got != n {
                return Err(p.err(
                    esc,
                    format!("escape `{what}` needs exactly {n} hex digits (in the {construct})"),
                ));
            }
            let v = u32::from_str_radix(&digits[..n], 16).expect("hex digits");
            p.pos += 2 + n;
            Ok(v)
        };
        match self.peek_at(1) {
            b'x' => hex(self, 2, "\\x"),
            b'u' => hex(self, 4, "\\u"),
            b'U' => hex(self, 8, "\\U"),
            b't' | b'r' | b'n' | b'\\' | b'"' | b'[' | b']' | b'-' => {
                let c = match self.peek_at(1) {
                    b't' => '\t',
                    b'r' => '\r',
                    b'n' => '\n',
                    other => other as char,
                };
                self.pos += 2;
                Ok(c as u32)
            }
            _ if self.pos + 1 >= self.bytes.len() => Err(self.err(
                start,
                format!("unterminated {construct} (it ends with a lone `\\`)"),
            )),
            _ => {
                let c = self.text[self.pos + 1..].chars().next().unwrap_or('?');
                Err(self.err(
                    esc,
                    format!(
                        "unknown escape `\\{}` in the {construct} (GBNF knows \\x \\u \\U \\t \\r \\n \\\\ \\\" \\[ \\] \\-)",
                        c.escape_debug()
                    ),
                ))
            }
        }
    }

    /// llama.cpp's `parse_token` for `<[id]>`, `<name>` and their `!` negations.
    fn token(&mut self) -> Result<Item, GbnfError> {
        let start = self.pos;
        let negated = self.peek() == b'!';
        if negated {
            self.pos += 1;
            if self.peek() != b'<' {
                return Err(self.err(
                    start,
                    format!(
                        "expected `<` after `!` (a negated token is `!<[id]>`), found {}",
                        describe_char(self.text, self.pos)
                    ),
                ));
            }
        }
        let open = self.pos;
        self.pos += 1;
        if self.peek() == b'[' {
            self.pos += 1;
            if !self.peek().is_ascii_digit() {
                return Err(self.err(
                    self.pos,
                    format!(
                        "expected a token id in the token `<[...]>`, found {}",
                        describe_char(self.text, self.pos)
                    ),
                ));
            }
            let digits_start = self.pos;
            let n = self.int(open)?;
            let id = u32::try_from(n).map_err(|_| {
                self.err(
                    digits_start,
                    format!(
                        "token id {n} in `<[...]>` is too large (at most {})",
                        u32::MAX
                    ),
                )
            })?;
            if !self.text[self.pos..].starts_with("]>") {
                return Err(self.err(
                    self.pos,
                    format!(
                        "expected `]>` to end the token `<[{id}`, found {}",
                        describe_char(self.text, self.pos)
                    ),
                ));
            }
            self.pos += 2;
            return Ok(Item::Token {
                spec: TokenSpec::Id(id),
                negated,
            });
        }
        let Some(len) = self.text[self.pos..].find('>') else {
            return Err(self.err(open, "unterminated token `<...`: missing `>`"));
        };
        self.pos += len + 1;
        let text = &self.text[open..self.pos];
        if negated {
            return Err(self.err(
                start,
                format!(
                    "negated token by name `!{text}` is not supported: llguidance can only \
                     negate token ids, so write `!<[id]>` with the id of {text}"
                ),
            ));
        }
        if len == 0
            || text[1..text.len() - 1]
                .chars()
                .any(|c| c.is_whitespace() || c == '<')
        {
            return Err(self.err(
                open,
                format!(
                    "token `{}` cannot be expressed in llguidance (a token name must be \
                     non-empty, without whitespace or `<`); use `<[id]>`",
                    text.escape_debug()
                ),
            ));
        }
        Ok(Item::Token {
            spec: TokenSpec::Name(text.to_string()),
            negated: false,
        })
    }
}

// ---------------------------------------------------------------------------------------
// llama.cpp's left-recursion check
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
enum LrElem {
    Term,
    Ref(usize),
}

struct LrNode {
    alts: Vec<Vec<LrElem>>,
    owner: usize,
}

/// Lowers the AST the way llama.cpp generates its rules (one helper rule per group and
/// one per repetition; the chain of helper rules of a bounded repetition is collapsed
/// into one node, which finds the same cycles) and refuses the grammar if llama.cpp's
/// `llama_grammar_detect_left_recursion` would.
fn check_left_recursion(ast: &Ast, text: &str) -> Result<(), GbnfError> {
    fn lower_item(item: &Item, owner: usize, nodes: &mut Vec<LrNode>) -> Vec<LrElem> {
        match item {
            Item::Lit(v) if v.is_empty() => Vec::new(),
            Item::Lit(_) | Item::Class(_) | Item::Any | Item::Token { .. } => vec![LrElem::Term],
            Item::Ref(r) => vec![LrElem::Ref(*r)],
            Item::Group(alts) => {
                let id = nodes.len();
                nodes.push(LrNode {
                    alts: Vec::new(),
                    owner,
                });
                let lowered = alts.iter().map(|s| lower_seq(s, owner, nodes)).collect();
                nodes[id].alts = lowered;
                vec![LrElem::Ref(id)]
            }
            Item::Repeat { item, min, max } => {
                let e = lower_item(item, owner, nodes);
                let mut out = if *min > 0 { e.clone() } else { Vec::new() };
                let n_opt = max.map_or(1, |n| n - min);
                if n_opt > 0 {
                    let id = nodes.len();
                    let mut first = e;
                    if max.is_none() {
                        first.push(LrElem::Ref(id));
                    }
                    nodes.push(LrNode {
                        alts: vec![first, Vec::new()],
                        owner,
                    });
                    out.push(LrElem::Ref(id));
                }
                out
            }
        }
    }
    fn lower_seq(seq: &Seq, owner: usize, nodes: &mut Vec<LrNode>) -> Vec<LrElem> {
        seq.iter()
            .flat_map(|item| lower_item(item, owner, nodes))
            .collect()
    }

    let mut nodes: Vec<LrNode> = (0..ast.rules.len())
        .map(|owner| LrNode {
            alts: Vec::new(),
            owner,
        })
        .collect();
    for (id, rule) in ast.rules.iter().enumerate() {
        let body = rule.body.as_deref().unwrap_or_default();
        let alts = body.iter().map(|s| lower_seq(s, id, &mut nodes)).collect();
        nodes[id].alts = alts;
    }
    for (owner, body) in &ast.orphans {
        for s in body {
            lower_seq(s, *owner, &mut nodes);
        }
    }

    let may_be_empty: Vec<bool> = nodes
        .iter()
        .map(|n| n.alts.iter().any(Vec::is_empty))
        .collect();
    let edges: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            let mut out = Vec::new();
            for alt in &n.alts {
                for e in alt {
                    match e {
                        LrElem::Ref(x) => {
                            out.push(*x);
                            if !may_be_empty[*x] {
                                break;
                            }
                        }
                        LrElem::Term => break,
                    }
                }
            }
            out
        })
        .collect();

    // Iterative DFS: a grey successor closes a cycle.
    let mut color = vec![0u8; nodes.len()];
    for s in 0..nodes.len() {
        if color[s] != 0 {
            continue;
        }
        let mut stack = vec![(s, 0usize)];
        color[s] = 1;
        while let Some(top) = stack.last_mut() {
            let (n, i) = *top;
            if let Some(&m) = edges[n].get(i) {
                top.1 += 1;
                match color[m] {
                    0 => {
                        color[m] = 1;
                        stack.push((m, 0));
                    }
                    1 => {
                        let rule = &ast.rules[nodes[m].owner];
                        return Err(error_at(
                            text,
                            rule.def_pos,
                            format!(
                                "left recursion in rule `{}`: llama.cpp refuses grammars where \
                                 a rule can reach itself again before matching a character",
                                rule.name
                            ),
                        ));
                    }
                    _ => {}
                }
            } else {
                color[n] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The character-level grammar graph
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Kind {
    /// One character of the set (empty set: matches nothing).
    Chars(CharSet),
    Seq(Vec<usize>),
    Alt(Vec<usize>),
    Rep(usize, u32, Option<u32>),
    Ref(usize),
    Tok(TokenSpec, bool),
}

struct Graph {
    kinds: Vec<Kind>,
    parent: Vec<Option<usize>>,
    /// The rule whose body (or a part of it) each node is.
    owner: Vec<usize>,
    /// For the root node of a rule body, that rule.
    body_of: Vec<Option<usize>>,
    body: Vec<usize>,
    /// The `Ref` nodes of each rule.
    refs: Vec<Vec<usize>>,
    /// The first node of each rule body (bodies are contiguous, children before parents).
    body_start: Vec<usize>,
    /// A synthetic `Ref(root)`: what `start:` matches.
    start: usize,
}

impl Graph {
    /// The nodes whose value depends on node `i`'s: its parent, and the references to the
    /// rule whose body it is.
    fn dependents(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.parent[i].into_iter().chain(
            self.body_of[i]
                .into_iter()
                .flat_map(move |r| self.refs[r].iter().copied()),
        )
    }

    fn build(ast: &Ast) -> Graph {
        let n = ast.rules.len();
        let mut g = Graph {
            kinds: Vec::new(),
            parent: Vec::new(),
            owner: Vec::new(),
            body_of: Vec::new(),
            body: vec![0; n],
            refs: vec![Vec::new(); n],
            body_start: vec![0; n],
            start: 0,
        };
        for (r, rule) in ast.rules.iter().enumerate() {
            g.body_start[r] = g.kinds.len();
            let body = rule.body.as_deref().unwrap_or_default();
            let id = g.alts(body, r);
            g.body[r] = id;
            g.body_of[id] = Some(r);
        }
        g.start = g.push(Kind::Ref(ast.root), ast.root);
        g.refs[ast.root].push(g.start);
        g
    }

    fn push(&mut self, kind: Kind, owner: usize) -> usize {
        let id = self.kinds.len();
        let children: Vec<usize> = match &kind {
            Kind::Seq(cs) | Kind::Alt(cs) => cs.clone(),
            Kind::Rep(x, ..) => vec![*x],
            _ => Vec::new(),
        };
        for c in children {
            self.parent[c] = Some(id);
        }
        self.kinds.push(kind);
        self.parent.push(None);
        self.owner.push(owner);
        self.body_of.push(None);
        id
    }

    fn alts(&mut self, alts: &[Seq], owner: usize) -> usize {
        let seqs = alts.iter().map(|s| self.seq(s, owner)).collect();
        self.push(Kind::Alt(seqs), owner)
    }

    fn seq(&mut self, seq: &Seq, owner: usize) -> usize {
        let items = seq.iter().map(|i| self.item(i, owner)).collect();
        self.push(Kind::Seq(items), owner)
    }

    fn item(&mut self, item: &Item, owner: usize) -> usize {
        match item {
            Item::Lit(chars) if chars.len() == 1 => {
                self.push(Kind::Chars(CharSet::single(chars[0])), owner)
            }
            Item::Lit(chars) => {
                let cs = chars
                    .iter()
                    .map(|&c| self.push(Kind::Chars(CharSet::single(c)), owner))
                    .collect();
                self.push(Kind::Seq(cs), owner)
            }
            Item::Class(set) => self.push(Kind::Chars(set.clone()), owner),
            Item::Any => self.push(Kind::Chars(CharSet::all()), owner),
            Item::Token { spec, negated } => self.push(Kind::Tok(spec.clone(), *negated), owner),
            Item::Ref(r) => {
                let id = self.push(Kind::Ref(*r), owner);
                self.refs[*r].push(id);
                id
            }
            Item::Group(alts) => self.alts(alts, owner),
            Item::Repeat { item, min, max } => {
                let x = self.item(item, owner);
                self.push(Kind::Rep(x, *min, *max), owner)
            }
        }
    }

    fn children(&self, n: usize) -> &[usize] {
        match &self.kinds[n] {
            Kind::Seq(cs) | Kind::Alt(cs) => cs,
            Kind::Rep(x, ..) => std::slice::from_ref(x),
            _ => &[],
        }
    }

    fn len(&self) -> usize {
        self.kinds.len()
    }
}

/// Bottom-up fixpoint over the active nodes (FIRST-like sets). `leaf` gives the value of
/// atomic nodes; `reverse` scans sequences from the end (LAST-like sets).
fn fixpoint_up<L: Lattice>(
    g: &Graph,
    active: &[bool],
    bottom: &L,
    nullable: &[bool],
    reverse: bool,
    leaf: &dyn Fn(usize) -> Option<L>,
    work: &mut u64,
) -> Vec<L> {
    let n = g.len();
    let mut val = vec![bottom.clone(); n];
    let mut queued = vec![false; n];
    let mut queue: std::collections::VecDeque<usize> = (0..n).filter(|&i| active[i]).collect();
    for &i in &queue {
        queued[i] = true;
    }
    while let Some(i) = queue.pop_front() {
        queued[i] = false;
        *work += 1;
        let new = if let Some(v) = leaf(i) {
            v
        } else {
            let mut acc = bottom.clone();
            match &g.kinds[i] {
                Kind::Seq(cs) => {
                    let mut scan = |c: &usize| {
                        acc.join_from(&val[*c]);
                        nullable[*c]
                    };
                    if reverse {
                        for c in cs.iter().rev() {
                            if !scan(c) {
                                break;
                            }
                        }
                    } else {
                        for c in cs {
                            if !scan(c) {
                                break;
                            }
                        }
                    }
                }
                Kind::Alt(cs) => {
                    for c in cs {
                        acc.join_from(&val[*c]);
                    }
                }
                Kind::Rep(x, _, max) => {
                    if *max != Some(0) {
                        acc.join_from(&val[*x]);
                    }
                }
                Kind::Ref(r) => {
                    acc.join_from(&val[g.body[*r]]);
                }
                Kind::Chars(_) | Kind::Tok(..) => {}
            }
            acc
        };
        if val[i].join_from(&new) {
            for j in g.dependents(i) {
                if active[j] && !queued[j] {
                    queued[j] = true;
                    queue.push_back(j);
                }
            }
        }
    }
    val
}

/// Top-down fixpoint (FOLLOW-like sets) over the active nodes, from the FIRST-like sets.
fn fixpoint_down<L: Lattice>(
    g: &Graph,
    active: &[bool],
    bottom: &L,
    nullable: &[bool],
    first: &[L],
    is_leaf: &dyn Fn(usize) -> bool,
    work: &mut u64,
) -> Vec<L> {
    let n = g.len();
    let mut val = vec![bottom.clone(); n];
    let mut queued = vec![false; n];
    let mut queue: std::collections::VecDeque<usize> =
        (0..n).rev().filter(|&i| active[i] && !is_leaf(i)).collect();
    for &i in &queue {
        queued[i] = true;
    }
    while let Some(p) = queue.pop_front() {
        queued[p] = false;
        *work += 1;
        let mut updates: Vec<(usize, L)> = Vec::new();
        match &g.kinds[p] {
            Kind::Seq(cs) => {
                let mut acc = val[p].clone();
                for &c in cs.iter().rev() {
                    updates.push((c, acc.clone()));
                    if nullable[c] {
                        acc.join_from(&first[c]);
                    } else {
                        acc = first[c].clone();
                    }
                }
            }
            Kind::Alt(cs) => {
                for &c in cs {
                    updates.push((c, val[p].clone()));
                }
            }
            Kind::Rep(x, _, max) => {
                let mut acc = val[p].clone();
                if max.is_none_or(|m| m >= 2) {
                    acc.join_from(&first[*x]);
                }
                updates.push((*x, acc));
            }
            Kind::Ref(r) => updates.push((g.body[*r], val[p].clone())),
            Kind::Chars(_) | Kind::Tok(..) => {}
        }
        for (c, v) in updates {
            if active[c] && val[c].join_from(&v) && !is_leaf(c) && !queued[c] {
                queued[c] = true;
                queue.push_back(c);
            }
        }
    }
    val
}

/// Language-level facts about every node, independent of the choice of lexemes.
struct Analysis {
    /// Matches at least one string.
    productive: Vec<bool>,
    /// Matches the empty string.
    nullable: Vec<bool>,
    /// Matches a non-empty string.
    nonempty: Vec<bool>,
    first: Vec<CharSet>,
    last: Vec<CharSet>,
    follow: Vec<CharSet>,
    /// No token and no recursion below: can be one terminal.
    regular: Vec<bool>,
    /// How deep the node's tree is, with the bodies of referenced (regular) rules inlined.
    unit_depth: Vec<usize>,
}

impl Analysis {
    fn new(g: &Graph) -> Analysis {
        let n = g.len();
        let all = vec![true; n];
        let mut work = 0;

        // productive / nullable / nonempty: boolean fixpoints, ordered children first.
        let productive = bool_fixpoint(g, |g, i, v: &[bool]| match &g.kinds[i] {
            Kind::Chars(s) => !s.is_empty(),
            Kind::Tok(..) => true,
            Kind::Seq(cs) => cs.iter().all(|&c| v[c]),
            Kind::Alt(cs) => cs.iter().any(|&c| v[c]),
            Kind::Rep(x, min, _) => *min == 0 || v[*x],
            Kind::Ref(r) => v[g.body[*r]],
        });
        let nullable = bool_fixpoint(g, |g, i, v: &[bool]| match &g.kinds[i] {
            Kind::Chars(_) | Kind::Tok(..) => false,
            Kind::Seq(cs) => cs.iter().all(|&c| v[c]),
            Kind::Alt(cs) => cs.iter().any(|&c| v[c]),
            Kind::Rep(x, min, _) => *min == 0 || v[*x],
            Kind::Ref(r) => v[g.body[*r]],
        });
        let nonempty = bool_fixpoint(g, |g, i, v: &[bool]| match &g.kinds[i] {
            Kind::Chars(s) => !s.is_empty(),
            Kind::Tok(..) => true,
            Kind::Seq(cs) => cs.iter().all(|&c| productive[c]) && cs.iter().any(|&c| v[c]),
            Kind::Alt(cs) => cs.iter().any(|&c| v[c]),
            Kind::Rep(x, _, max) => *max != Some(0) && v[*x],
            Kind::Ref(r) => v[g.body[*r]],
        });

        let leaf = |i: usize| match &g.kinds[i] {
            Kind::Chars(s) => Some(s.clone()),
            Kind::Tok(..) => Some(CharSet::default()),
            _ => None,
        };
        let bottom = CharSet::default();
        let first = fixpoint_up(g, &all, &bottom, &nullable, false, &leaf, &mut work);
        let last = fixpoint_up(g, &all, &bottom, &nullable, true, &leaf, &mut work);
        let is_leaf = |i: usize| matches!(g.kinds[i], Kind::Chars(_) | Kind::Tok(..));
        let follow = fixpoint_down(g, &all, &bottom, &nullable, &first, &is_leaf, &mut work);

        // Regular rules: no token in the body and only regular rules referenced, found in
        // dependency order (rules on or above a cycle never qualify).
        let rules = g.body.len();
        let mut has_token = vec![false; rules];
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); rules];
        for i in 0..n {
            match &g.kinds[i] {
                Kind::Tok(..) => has_token[g.owner[i]] = true,
                Kind::Ref(r) if i != g.start => deps[g.owner[i]].push(*r),
                _ => {}
            }
        }
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); rules];
        let mut pending = vec![0usize; rules];
        for (r, ds) in deps.iter_mut().enumerate() {
            ds.sort_unstable();
            ds.dedup();
            pending[r] = ds.len();
            for &d in ds.iter() {
                dependents[d].push(r);
            }
        }
        let mut regular_rule = vec![false; rules];
        let mut order = Vec::new();
        let mut ready: Vec<usize> = (0..rules)
            .filter(|&r| pending[r] == 0 && !has_token[r])
            .collect();
        while let Some(r) = ready.pop() {
            regular_rule[r] = true;
            order.push(r);
            for &d in &dependents[r] {
                pending[d] -= 1;
                if pending[d] == 0 && !has_token[d] {
                    ready.push(d);
                }
            }
        }

        // Node regularity and depth; bodies of regular rules are processed in dependency
        // order so that references see the depth of the referenced body.
        let mut regular = vec![false; n];
        let mut unit_depth = vec![usize::MAX; n];
        let eval = |i: usize, regular: &mut Vec<bool>, unit_depth: &mut Vec<usize>| {
            let (reg, depth) = match &g.kinds[i] {
                Kind::Chars(_) => (true, 1),
                Kind::Tok(..) => (false, usize::MAX),
                Kind::Ref(r) => (regular_rule[*r], unit_depth[g.body[*r]].saturating_add(1)),
                _ => {
                    let cs = g.children(i);
                    (
                        cs.iter().all(|&c| regular[c]),
                        cs.iter()
                            .map(|&c| unit_depth[c])
                            .max()
                            .unwrap_or(0)
                            .saturating_add(1),
                    )
                }
            };
            regular[i] = reg;
            unit_depth[i] = if reg { depth } else { usize::MAX };
        };
        let mut done = vec![false; rules];
        for &r in &order {
            for i in g.body_start[r]..=g.body[r] {
                eval(i, &mut regular, &mut unit_depth);
            }
            done[r] = true;
        }
        for (r, &finished) in done.iter().enumerate() {
            if !finished {
                for i in g.body_start[r]..=g.body[r] {
                    eval(i, &mut regular, &mut unit_depth);
                }
            }
        }
        eval(g.start, &mut regular, &mut unit_depth);

        Analysis {
            productive,
            nullable,
            nonempty,
            first,
            last,
            follow,
            regular,
            unit_depth,
        }
    }

    /// Emitted at all: matches some non-empty string.
    fn emitted(&self, i: usize) -> bool {
        self.productive[i] && self.nonempty[i]
    }
}

/// A monotone boolean fixpoint over all nodes.
fn bool_fixpoint(g: &Graph, eval: impl Fn(&Graph, usize, &[bool]) -> bool) -> Vec<bool> {
    let n = g.len();
    let mut v = vec![false; n];
    let mut queued = vec![true; n];
    let mut queue: std::collections::VecDeque<usize> = (0..n).collect();
    while let Some(i) = queue.pop_front() {
        queued[i] = false;
        if !v[i] && eval(g, i, &v) {
            v[i] = true;
            for j in g.dependents(i) {
                if !queued[j] {
                    queued[j] = true;
                    queue.push_back(j);
                }
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// Choosing the lexemes
// ---------------------------------------------------------------------------------------

/// Which nodes are lexemes and which Lark rules are emitted.
struct Selection {
    /// Regular nodes that must not be one terminal.
    split: Vec<bool>,
    /// Lexeme occurrences: characters, tokens and terminals.
    lexemes: Vec<usize>,
    is_lexeme: Vec<bool>,
    /// Nodes emitted as Lark structure or lexemes.
    active: Vec<bool>,
    /// GBNF rules emitted as Lark rules, in order of discovery.
    lark_rules: Vec<usize>,
}

/// A regular node that becomes one terminal (unless the conflict check split it).
fn is_unit(a: &Analysis, split: &[bool], i: usize) -> bool {
    a.regular[i] && a.emitted(i) && !split[i] && a.unit_depth[i] <= MAX_UNIT_DEPTH
}

fn walk(g: &Graph, a: &Analysis, split: Vec<bool>) -> Selection {
    let n = g.len();
    let mut sel = Selection {
        split,
        lexemes: Vec::new(),
        is_lexeme: vec![false; n],
        active: vec![false; n],
        lark_rules: Vec::new(),
    };
    let mut rule_seen = vec![false; g.body.len()];
    let mut stack = vec![g.start];
    while let Some(i) = stack.pop() {
        if !a.emitted(i) || sel.active[i] {
            continue;
        }
        sel.active[i] = true;
        let lexeme =
            matches!(g.kinds[i], Kind::Chars(_) | Kind::Tok(..)) || is_unit(a, &sel.split, i);
        if lexeme {
            sel.is_lexeme[i] = true;
            sel.lexemes.push(i);
            continue;
        }
        match &g.kinds[i] {
            Kind::Ref(r) => {
                if !rule_seen[*r] {
                    rule_seen[*r] = true;
                    sel.lark_rules.push(*r);
                    stack.push(g.body[*r]);
                }
            }
            _ => {
                for &c in g.children(i).iter().rev() {
                    stack.push(c);
                }
            }
        }
    }
    sel
}

/// Marks a terminal to be split, together with the wrappers that match the same language
/// (which would only fail the same check in the next round).
fn split_unit(g: &Graph, split: &mut [bool], i: usize) {
    let mut i = i;
    loop {
        split[i] = true;
        i = match &g.kinds[i] {
            Kind::Ref(r) => g.body[*r],
            Kind::Alt(cs) | Kind::Seq(cs) if cs.len() == 1 => cs[0],
            Kind::Rep(x, 1, Some(1)) => *x,
            _ => return,
        };
        if split[i] {
            return;
        }
    }
}

/// Marks a terminal and every part of it (down to its characters and rule references) to
/// be split.
fn split_subtree(g: &Graph, split: &mut [bool], i: usize) {
    let mut stack = vec![i];
    while let Some(j) = stack.pop() {
        split_unit(g, split, j);
        stack.extend_from_slice(g.children(j));
    }
}

/// Chooses the lexemes; `budget` bounds the analysis work (see [`WORK_BUDGET`]).
fn select_lexemes(g: &Graph, a: &Analysis, budget: u64) -> Selection {
    let mut work = 0u64;
    let mut split = vec![false; g.len()];
    for round in 0..MAX_ROUNDS {
        let sel = walk(g, a, split);
        match find_conflicts(g, a, &sel, &mut work, budget) {
            Some(bad) if bad.is_empty() => return sel,
            Some(bad) => {
                split = sel.split;
                for b in bad {
                    // Splitting one level at a time keeps the largest terminals that pass,
                    // but deep nesting would take many rounds: after a few, a terminal
                    // that still fails is split all the way down.
                    if round < SPLIT_LEVEL_ROUNDS {
                        split_unit(g, &mut split, b);
                    } else {
                        split_subtree(g, &mut split, b);
                    }
                }
            }
            None => break,
        }
    }
    // One-character lexemes everywhere: always exact.
    walk(g, a, vec![true; g.len()])
}

/// A lexeme occurrence as seen by the conflict check.
struct LexInfo {
    node: usize,
    /// Characters and terminals (not tokens).
    chars: bool,
    /// A terminal made of more than a single character class.
    unit: bool,
    first_bytes: ByteSet,
    follow_bytes: ByteSet,
}

/// Terminals that fail the greedy-lexing check (empty: the selection is exact), or
/// `None` if the work budget ran out.
fn find_conflicts(
    g: &Graph,
    a: &Analysis,
    sel: &Selection,
    work: &mut u64,
    budget: u64,
) -> Option<Vec<usize>> {
    let lex: Vec<LexInfo> = sel
        .lexemes
        .iter()
        .map(|&i| {
            let chars = !matches!(g.kinds[i], Kind::Tok(..));
            LexInfo {
                node: i,
                chars,
                unit: chars && !matches!(g.kinds[i], Kind::Chars(_)),
                first_bytes: a.first[i].first_bytes(),
                follow_bytes: a.follow[i].first_bytes(),
            }
        })
        .collect();
    if !lex.iter().any(|l| l.unit) {
        return Some(Vec::new());
    }
    let co = CoAllowed::new(g, a, sel, &lex, work);
    if *work > budget {
        return None;
    }

    let mut nfas: Vec<Option<Option<Nfa>>> = (0..lex.len()).map(|_| None).collect();
    let mut bad = Vec::new();
    for bi in 0..lex.len() {
        if !lex[bi].unit {
            continue;
        }
        let Some(nfa_b) = Nfa::build(g, a, lex[bi].node) else {
            *work += MAX_NFA_STATES as u64;
            bad.push(lex[bi].node);
            continue;
        };
        *work += nfa_b.edges.len() as u64;
        let coreach = nfa_b.coreachable();
        let allowed_with_b = co.context_of(bi);
        for ai in 0..lex.len() {
            let al = &lex[ai];
            if !al.chars || !al.first_bytes.intersects(&lex[bi].first_bytes) {
                continue;
            }
            if ai != bi && !co.coallowed(ai, &allowed_with_b) {
                continue;
            }
            let nfa_a = nfas[ai].get_or_insert_with(|| {
                let nfa = Nfa::build(g, a, al.node);
                *work += nfa.as_ref().map_or(MAX_NFA_STATES, |n| n.edges.len()) as u64;
                nfa
            });
            // A terminal too big to analyse is split when it is checked as `b`, so that
            // a round without conflicts has built every automaton; skip it here.
            let conflict = match nfa_a {
                Some(nfa_a) => {
                    greedy_conflict(nfa_a, &al.follow_bytes, &nfa_b, &coreach, work, budget)?
                }
                None => false,
            };
            if conflict {
                bad.push(lex[bi].node);
                break;
            }
        }
        if *work > budget {
            return None;
        }
    }
    Some(bad)
}

/// Which lexeme occurrences can be allowed at the same position.
///
/// Two occurrences are co-allowed if lexemes that can immediately precede them (or the
/// start of the input) can match the same text: the llguidance lexer reports, at a
/// lexeme boundary, every allowed lexeme matching the text read, and the parser then
/// allows whatever can follow any of them. "Can match the same text" is approximated by
/// "share a first byte and a last character" (or are both tokens).
struct CoAllowed {
    /// For each lexeme, the preceding lexemes (index `lex.len()` is the start).
    pred: Vec<BitSet>,
    /// For each lexeme (and the start), the ones that may match the same text.
    coincide: Vec<BitSet>,
    precise: bool,
}

impl CoAllowed {
    fn new(g: &Graph, a: &Analysis, sel: &Selection, lex: &[LexInfo], work: &mut u64) -> CoAllowed {
        let m = lex.len();
        if m > MAX_PRECISE_LEXEMES {
            return CoAllowed {
                pred: Vec::new(),
                coincide: Vec::new(),
                precise: false,
            };
        }
        let mut index = vec![usize::MAX; g.len()];
        for (k, l) in lex.iter().enumerate() {
            index[l.node] = k;
        }
        let bottom = BitSet::new(m + 1);
        let leaf = |i: usize| {
            sel.is_lexeme[i].then(|| {
                let mut b = bottom.clone();
                b.insert(index[i]);
                b
            })
        };
        let first = fixpoint_up(g, &sel.active, &bottom, &a.nullable, false, &leaf, work);
        let is_leaf = |i: usize| sel.is_lexeme[i];
        let follow = fixpoint_down(g, &sel.active, &bottom, &a.nullable, &first, &is_leaf, work);

        let mut pred = vec![bottom.clone(); m];
        for (k, l) in lex.iter().enumerate() {
            for j in follow[l.node].iter() {
                if j < m {
                    pred[j].insert(k);
                }
            }
        }
        for j in first[g.start].iter() {
            if j < m {
                pred[j].insert(m);
            }
        }

        let mut coincide = vec![bottom.clone(); m + 1];
        coincide[m].insert(m);
        for i in 0..m {
            coincide[i].insert(i);
            for j in i + 1..m {
                *work += 1;
                let same = match (lex[i].chars, lex[j].chars) {
                    (false, false) => true,
                    (true, true) => {
                        lex[i].first_bytes.intersects(&lex[j].first_bytes)
                            && a.last[lex[i].node].intersects(&a.last[lex[j].node])
                    }
                    _ => false,
                };
                if same {
                    coincide[i].insert(j);
                    coincide[j].insert(i);
                }
            }
        }
        CoAllowed {
            pred,
            coincide,
            precise: true,
        }
    }

    /// The lexemes (and start) that coincide with something preceding lexeme `b`.
    fn context_of(&self, b: usize) -> Option<BitSet> {
        if !self.precise {
            return None;
        }
        let mut ctx = BitSet::new(self.coincide.len());
        for p in self.pred[b].iter() {
            if p < self.coincide.len() {
                ctx.join_from(&self.coincide[p]);
            }
        }
        Some(ctx)
    }

    fn coallowed(&self, a: usize, context_of_b: &Option<BitSet>) -> bool {
        match context_of_b {
            Some(ctx) => self.pred[a].intersects(ctx),
            None => true,
        }
    }
}

/// A nondeterministic automaton with epsilon moves over character sets.
struct Nfa {
    /// `(set index, or None for epsilon; target)`.
    edges: Vec<Vec<(Option<usize>, usize)>>,
    sets: Vec<(CharSet, ByteSet)>,
    start: usize,
    accept: usize,
}

impl Nfa {
    /// The automaton of a regular node (over-approximating large repetition counts), or
    /// `None` if it would be too big.
    fn build(g: &Graph, a: &Analysis, node: usize) -> Option<Nfa> {
        let mut nfa = Nfa {
            edges: Vec::new(),
            sets: Vec::new(),
            start: 0,
            accept: 0,
        };
        let start = nfa.state()?;
        let end = nfa.frag(g, a, node, start)?;
        nfa.start = start;
        nfa.accept = end;
        Some(nfa)
    }

    fn state(&mut self) -> Option<usize> {
        if self.edges.len() >= MAX_NFA_STATES {
            return None;
        }
        self.edges.push(Vec::new());
        Some(self.edges.len() - 1)
    }

    fn eps(&mut self, from: usize, to: usize) {
        self.edges[from].push((None, to));
    }

    /// Adds the node's language from state `s`; returns the end state.
    fn frag(&mut self, g: &Graph, a: &Analysis, i: usize, s: usize) -> Option<usize> {
        if !a.productive[i] {
            return self.state(); // unreachable end: matches nothing
        }
        match &g.kinds[i] {
            Kind::Chars(set) => {
                let e = self.state()?;
                self.sets.push((set.clone(), set.first_bytes()));
                self.edges[s].push((Some(self.sets.len() - 1), e));
                Some(e)
            }
            Kind::Seq(cs) => {
                let mut cur = s;
                for &c in cs {
                    cur = self.frag(g, a, c, cur)?;
                }
                Some(cur)
            }
            Kind::Alt(cs) => {
                let e = self.state()?;
                for &c in cs {
                    let b = self.state()?;
                    self.eps(s, b);
                    let x = self.frag(g, a, c, b)?;
                    self.eps(x, e);
                }
                Some(e)
            }
            Kind::Rep(x, min, max) => {
                let exact = max.is_some_and(|m| m <= 3);
                let copies = if exact { *min } else { (*min).min(3) };
                let mut cur = s;
                for _ in 0..copies {
                    cur = self.frag(g, a, *x, cur)?;
                }
                if exact {
                    let e = self.state()?;
                    for _ in copies..max.unwrap_or(0) {
                        self.eps(cur, e);
                        cur = self.frag(g, a, *x, cur)?;
                    }
                    self.eps(cur, e);
                    Some(e)
                } else {
                    // x*: a loop through one copy.
                    let e = self.state()?;
                    self.eps(cur, e);
                    let inner = self.frag(g, a, *x, cur)?;
                    self.eps(inner, cur);
                    Some(e)
                }
            }
            Kind::Ref(r) => self.frag(g, a, g.body[*r], s),
            Kind::Tok(..) => self.state(),
        }
    }

    /// States from which the accepting state is reachable.
    fn coreachable(&self) -> Vec<bool> {
        let mut rev: Vec<Vec<usize>> = vec![Vec::new(); self.edges.len()];
        for (s, es) in self.edges.iter().enumerate() {
            for &(_, t) in es {
                rev[t].push(s);
            }
        }
        let mut seen = vec![false; self.edges.len()];
        let mut stack = vec![self.accept];
        seen[self.accept] = true;
        while let Some(s) = stack.pop() {
            for &p in &rev[s] {
                if !seen[p] {
                    seen[p] = true;
                    stack.push(p);
                }
            }
        }
        seen
    }
}

/// Is there a non-empty `w` matched by `a`, followed by a character whose first byte is
/// in `follow`, such that `w` plus that byte starts something `b` matches? (Then a greedy
/// lexer that allows both would read past the end of `a`.) `None` if the budget ran out.
fn greedy_conflict(
    a: &Nfa,
    follow: &ByteSet,
    b: &Nfa,
    b_coreach: &[bool],
    work: &mut u64,
    budget: u64,
) -> Option<bool> {
    let mut seen: HashSet<(usize, usize, bool)> = HashSet::new();
    let mut stack = vec![(a.start, b.start, false)];
    seen.insert((a.start, b.start, false));
    while let Some((qa, qb, moved)) = stack.pop() {
        *work += 1;
        if *work > budget {
            return None;
        }
        if qa == a.accept && moved {
            for &(set, t) in &b.edges[qb] {
                if let Some(set) = set {
                    if b_coreach[t] && b.sets[set].1.intersects(follow) {
                        return Some(true);
                    }
                }
            }
        }
        let mut push = |st: (usize, usize, bool), stack: &mut Vec<_>| {
            if seen.insert(st) {
                stack.push(st);
            }
        };
        for &(la, ta) in &a.edges[qa] {
            match la {
                None => push((ta, qb, moved), &mut stack),
                Some(sa) => {
                    for &(lb, tb) in &b.edges[qb] {
                        if let Some(sb) = lb {
                            if b_coreach[tb] && a.sets[sa].0.intersects(&b.sets[sb].0) {
                                push((ta, tb, true), &mut stack);
                            }
                        }
                    }
                }
            }
        }
        for &(lb, tb) in &b.edges[qb] {
            if lb.is_none() && b_coreach[tb] {
                push((qa, tb, moved), &mut stack);
            }
        }
    }
    Some(false)
}

// ---------------------------------------------------------------------------------------
// Emitting Lark
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prec {
    /// `(...)`, a name, a literal: can take a repetition suffix.
    Atom,
    /// `a b`
    Seq,
}

struct Emitter<'a> {
    ast: &'a Ast,
    g: &'a Graph,
    a: &'a Analysis,
    sel: &'a Selection,
    used: HashSet<String>,
    rule_names: HashMap<usize, String>,
    term_names: HashMap<usize, String>,
    unit_names: HashMap<usize, String>,
    /// Terminal definitions still to write: (name, node).
    pending_terms: Vec<(String, usize)>,
}

impl<'a> Emitter<'a> {
    fn new(ast: &'a Ast, g: &'a Graph, a: &'a Analysis, sel: &'a Selection) -> Emitter<'a> {
        Emitter {
            ast,
            g,
            a,
            sel,
            used: ["start".to_string()].into_iter().collect(),
            rule_names: HashMap::new(),
            term_names: HashMap::new(),
            unit_names: HashMap::new(),
            pending_terms: Vec::new(),
        }
    }

    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut k = 2;
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }

    fn rule_name(&mut self, r: usize) -> String {
        if let Some(n) = self.rule_names.get(&r) {
            return n.clone();
        }
        let mut base = self.ast.rules[r].name.to_ascii_lowercase();
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
            base = format!("r_{base}");
        }
        let name = self.fresh(base);
        self.rule_names.insert(r, name.clone());
        name
    }

    fn upper_base(&self, r: usize) -> String {
        let base = self.ast.rules[r].name.to_ascii_uppercase();
        if base.starts_with(|c: char| c.is_ascii_uppercase()) {
            base
        } else {
            format!("T_{base}")
        }
    }

    /// The terminal for a whole regular rule.
    fn term_name(&mut self, r: usize) -> String {
        if let Some(n) = self.term_names.get(&r) {
            return n.clone();
        }
        let base = self.upper_base(r);
        let name = self.fresh(base);
        self.term_names.insert(r, name.clone());
        self.pending_terms.push((name.clone(), self.g.body[r]));
        name
    }

    /// The terminal for a lexeme occurrence that is part of a rule.
    fn unit_name(&mut self, i: usize) -> String {
        if let Some(n) = self.unit_names.get(&i) {
            return n.clone();
        }
        let base = format!("{}_{}", self.upper_base(self.g.owner[i]), i);
        let name = self.fresh(base);
        self.unit_names.insert(i, name.clone());
        self.pending_terms.push((name.clone(), i));
        name
    }

    fn emit(mut self) -> String {
        let mut out = String::from("// Translated from GBNF by etllm::grammar::gbnf\n");
        let start = self.g.start;
        let body = if !self.a.productive[start] {
            // The root matches nothing; a class without members keeps it that way.
            "/[^\\x{0}-\\x{10FFFF}]/".to_string()
        } else if !self.a.nonempty[start] {
            String::new() // only the empty string
        } else {
            self.rule_expr(start).0
        };
        out.push_str(&format!("start: {body}\n"));
        for k in 0..self.sel.lark_rules.len() {
            let r = self.sel.lark_rules[k];
            let name = self.rule_name(r);
            let body = self.rule_expr(self.g.body[r]).0;
            out.push_str(&format!("{name}: {body}\n"));
        }
        let mut k = 0;
        while k < self.pending_terms.len() {
            let (name, node) = self.pending_terms[k].clone();
            let body = self.term_expr(node).0;
            out.push_str(&format!("{name}: {body}\n"));
            k += 1;
        }
        out
    }

    /// A node emitted in a Lark rule (the node is emitted: productive and non-empty).
    fn rule_expr(&mut self, i: usize) -> (String, Prec) {
        if self.sel.is_lexeme[i] {
            return match &self.g.kinds[self.unwrap_single(i)] {
                Kind::Chars(set) => (char_literal(set), Prec::Atom),
                Kind::Tok(spec, negated) => (token_literal(spec, *negated), Prec::Atom),
                Kind::Ref(r) => (self.term_name(*r), Prec::Atom),
                _ => (self.unit_name(i), Prec::Atom),
            };
        }
        match &self.g.kinds[i] {
            Kind::Ref(r) => (self.rule_name(*r), Prec::Atom),
            _ => self.composite(i, false),
        }
    }

    /// The node that `i` only wraps: through sequences and alternations with a single
    /// emitted member (and no empty alternative).
    fn unwrap_single(&self, mut i: usize) -> usize {
        loop {
            let members: Vec<usize> = match &self.g.kinds[i] {
                Kind::Seq(cs) => cs.iter().copied().filter(|&c| self.a.emitted(c)).collect(),
                Kind::Alt(cs)
                    if cs
                        .iter()
                        .all(|&c| !self.a.productive[c] || self.a.nonempty[c]) =>
                {
                    cs.iter().copied().filter(|&c| self.a.emitted(c)).collect()
                }
                _ => return i,
            };
            match members.as_slice() {
                [only] => i = *only,
                _ => return i,
            }
        }
    }

    /// A node emitted inside a terminal definition (a regular node).
    fn term_expr(&mut self, i: usize) -> (String, Prec) {
        match &self.g.kinds[i] {
            Kind::Chars(set) => (char_literal(set), Prec::Atom),
            Kind::Ref(r) => (self.term_name(*r), Prec::Atom),
            Kind::Tok(spec, negated) => (token_literal(spec, *negated), Prec::Atom),
            _ => self.composite(i, true),
        }
    }

    fn sub(&mut self, i: usize, term: bool) -> (String, Prec) {
        if term {
            self.term_expr(i)
        } else {
            self.rule_expr(i)
        }
    }

    fn composite(&mut self, i: usize, term: bool) -> (String, Prec) {
        let g = self.g;
        match &g.kinds[i] {
            Kind::Seq(cs) => {
                let mut parts: Vec<(String, Prec)> = Vec::new();
                let mut run: Vec<u32> = Vec::new();
                for &c in cs {
                    if !self.a.emitted(c) {
                        continue;
                    }
                    // In terminals, consecutive single characters become one literal.
                    if term {
                        if let Kind::Chars(set) = &g.kinds[c] {
                            if let Some(ch) = set.as_single() {
                                run.push(ch);
                                continue;
                            }
                        }
                    }
                    if !run.is_empty() {
                        parts.push((string_literal(&run), Prec::Atom));
                        run.clear();
                    }
                    parts.push(self.sub(c, term));
                }
                if !run.is_empty() {
                    parts.push((string_literal(&run), Prec::Atom));
                }
                if parts.len() == 1 {
                    parts.pop().expect("one part")
                } else {
                    let text: Vec<String> = parts.into_iter().map(|(t, _)| t).collect();
                    (text.join(" "), Prec::Seq)
                }
            }
            Kind::Alt(cs) => {
                let mut parts: Vec<(String, Prec)> = Vec::new();
                let mut optional = false;
                for &c in cs {
                    if !self.a.productive[c] {
                        continue;
                    }
                    if !self.a.nonempty[c] {
                        optional = true;
                        continue;
                    }
                    let p = self.sub(c, term);
                    if !parts.iter().any(|(t, _)| *t == p.0) {
                        parts.push(p);
                    }
                }
                if parts.len() == 1 && !optional {
                    return parts.pop().expect("one part");
                }
                let text: Vec<String> = parts.into_iter().map(|(t, _)| t).collect();
                let body = format!("({})", text.join(" | "));
                (if optional { body + "?" } else { body }, Prec::Atom)
            }
            Kind::Rep(x, min, max) => {
                let (inner, prec) = self.sub(*x, term);
                let suffixed = inner.ends_with(['?', '*', '+', '}']);
                let inner = if prec == Prec::Atom && !suffixed {
                    inner
                } else {
                    format!("({inner})")
                };
                let suffix = match (min, max) {
                    (0, None) => "*".to_string(),
                    (1, None) => "+".to_string(),
                    (m, None) => format!("{{{m},}}"),
                    (0, Some(1)) => "?".to_string(),
                    (1, Some(1)) => String::new(),
                    (m, Some(n)) if m == n => format!("{{{m}}}"),
                    (m, Some(n)) => format!("{{{m},{n}}}"),
                };
                (inner + &suffix, Prec::Atom)
            }
            Kind::Chars(_) | Kind::Tok(..) | Kind::Ref(_) => self.sub(i, term),
        }
    }
}

/// A Lark (JSON-syntax) string literal.
fn string_literal(chars: &[u32]) -> String {
    let mut s = String::from("\"");
    for &c in chars {
        let ch = char::from_u32(c).expect("scalar value");
        match ch {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7F || (0x80..0xA0).contains(&(c as u32)) => {
                s.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// One character of `set`, as a string literal or a `/regex/` class.
fn char_literal(set: &CharSet) -> String {
    if let Some(c) = set.as_single() {
        return string_literal(&[c]);
    }
    if set.is_empty() {
        return "/[^\\x{0}-\\x{10FFFF}]/".to_string();
    }
    let complement = set.complement();
    if complement.is_empty() {
        return "/(?s:.)/".to_string();
    }
    fn class(ranges: &[(u32, u32)]) -> String {
        let mut s = String::new();
        for &(lo, hi) in ranges {
            s.push_str(&regex_char(lo));
            if hi > lo {
                if hi > lo + 1 {
                    s.push('-');
                }
                s.push_str(&regex_char(hi));
            }
        }
        s
    }
    if complement.ranges.len() < set.ranges.len() {
        format!("/[^{}]/", class(&complement.ranges))
    } else {
        format!("/[{}]/", class(&set.ranges))
    }
}

fn regex_char(c: u32) -> String {
    match char::from_u32(c) {
        Some(ch) if ch.is_ascii_alphanumeric() => ch.to_string(),
        _ => format!("\\x{{{c:X}}}"),
    }
}

fn token_literal(spec: &TokenSpec, negated: bool) -> String {
    match (spec, negated) {
        (TokenSpec::Id(id), false) => format!("<[{id}]>"),
        (TokenSpec::Id(id), true) => format!("<[^{id}]>"),
        // Negated names are refused by the parser.
        (TokenSpec::Name(name), _) => name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lark(gbnf: &str) -> String {
        gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf:?}: {e}"))
    }

    fn err(gbnf: &str) -> String {
        match gbnf_to_lark(gbnf) {
            Ok(l) => panic!("{gbnf:?} translated:\n{l}"),
            Err(e) => e.to_string(),
        }
    }

    /// The definition of the terminal a regular grammar becomes.
    fn root_term(gbnf: &str) -> String {
        let lines = body(gbnf);
        assert_eq!(lines[0], "start: ROOT", "{gbnf:?}: {lines:?}");
        assert_eq!(lines.len(), 2, "{gbnf:?}: {lines:?}");
        lines[1].strip_prefix("ROOT: ").expect("ROOT").to_string()
    }

    /// The `start:` line and the definitions, without the header comment.
    fn body(gbnf: &str) -> Vec<String> {
        lark(gbnf).lines().skip(1).map(str::to_string).collect()
    }

    #[test]
    fn char_sets_are_normalized_scalar_values() {
        let s = CharSet::from_ranges(vec![(b'c' as u32, b'a' as u32), (5, 3), (1, 2), (3, 4)]);
        assert_eq!(s.ranges, vec![(1, 4)], "reversed ranges are empty");
        let s = CharSet::from_ranges(vec![(0xD000, 0xE100), (0x10FFFF, 0xFFFF_FFFF)]);
        assert_eq!(
            s.ranges,
            vec![(0xD000, 0xD7FF), (0xE000, 0xE100), (0x10FFFF, 0x10FFFF)]
        );
        assert!(CharSet::single(0xD800).is_empty());
        assert!(CharSet::single(0x110000).is_empty());
        assert_eq!(CharSet::all().complement(), CharSet::default());
        let a = CharSet::from_ranges(vec![(b'a' as u32, b'z' as u32)]);
        assert_eq!(a.complement().complement(), a);
        assert!(a.intersects(&CharSet::single(b'q' as u32)));
        assert!(!a.intersects(&CharSet::single(b'A' as u32)));
        // First bytes of UTF-8: 'é' (C3 A9) and '😀' (F0 9F 98 80).
        let fb = CharSet::from_ranges(vec![(0xE9, 0xE9), (0x1F600, 0x1F600)]).first_bytes();
        let mut want = ByteSet::default();
        want.insert(0xC3);
        want.insert(0xF0);
        assert_eq!(fb, want);
    }

    #[test]
    fn literals_and_escapes() {
        assert_eq!(
            body(r#"root ::= "a\x41\u00e9\U0001F600\t\n\r\\\"\[\]\-" "#),
            ["start: ROOT", "ROOT: \"aAé😀\\t\\n\\r\\\\\\\"[]-\""]
        );
        // \xHH is a code point (U+00FF here), not a byte.
        assert_eq!(root_term(r#"root ::= "\xFF""#), "\"ÿ\"");
        // Raw non-ASCII, control characters (escaped in Lark) and NUL as an escape.
        assert_eq!(
            body("root ::= \"日本\\x01\\x7F\\x00\""),
            ["start: ROOT", "ROOT: \"日本\\u0001\\u007f\\u0000\""]
        );
    }

    #[test]
    fn classes() {
        assert_eq!(root_term("root ::= [a-z0-9_]"), "/[0-9\\x{5F}a-z]/");
        assert_eq!(root_term("root ::= [^a-z]"), "/[^a-z]/");
        assert_eq!(
            root_term("root ::= [^\"\\\\\\n]"),
            "/[^\\x{A}\\x{22}\\x{5C}]/"
        );
        assert_eq!(
            root_term("root ::= [\\]\\[\\-]"),
            "/[\\x{2D}\\x{5B}\\x{5D}]/"
        );
        assert_eq!(
            root_term("root ::= [a-]"),
            "/[\\x{2D}a]/",
            "a trailing - is literal"
        );
        assert_eq!(root_term("root ::= [ぁ-ゟ]"), "/[\\x{3041}-\\x{309F}]/");
        assert_eq!(root_term("root ::= ."), "/(?s:.)/");
        assert_eq!(root_term("root ::= [^\\x00-\\U0010FFFF] | \"x\""), "\"x\"");
        // Reversed ranges match nothing; `[]` matches the empty string (as in llama.cpp).
        assert_eq!(root_term("root ::= [z-a] | \"x\""), "\"x\"");
        assert_eq!(
            body("root ::= \"a\" [] \"b\" [^]"),
            ["start: ROOT", "ROOT: \"ab\""]
        );
        // Surrogates and values above U+10FFFF can never be produced.
        assert_eq!(root_term("root ::= \"\\uD800\" | \"b\""), "\"b\"");
        assert_eq!(
            root_term("root ::= [\\U00110000-\\UFFFFFFFF] | \"b\""),
            "\"b\""
        );
    }

    #[test]
    fn repetitions() {
        let cases = [
            ("\"ab\"*", "\"ab\"*"),
            ("\"ab\"+", "\"ab\"+"),
            ("\"ab\"?", "\"ab\"?"),
            ("(\"a\" \"b\")*", "\"ab\"*"),
            ("(\"a\" | \"b\")*", "(\"a\" | \"b\")*"),
            ("\"a\"{0,}", "\"a\"*"),
            ("\"a\"{1,}", "\"a\"+"),
            ("\"a\"{0,1}", "\"a\"?"),
            ("\"a\"{3}", "\"a\"{3}"),
            ("\"a\"{3,}", "\"a\"{3,}"),
            ("\"a\"{ 2 , 5 }", "\"a\"{2,5}"),
            ("\"a\"{1,1}", "\"a\""),
            ("\"a\"*?", "(\"a\"*)?"),
            ("[ab]{2}{3}", "(/[ab]/{2}){3}"),
            // llama.cpp: a maximum above 2000 means no maximum.
            ("\"a\"{0,3000}", "\"a\"*"),
            ("\"a\"{1999}", "\"a\"{1999}"),
        ];
        for (gbnf, want) in cases {
            let got = body(&format!("root ::= \"<\" {gbnf} \">\""));
            assert_eq!(
                got,
                ["start: ROOT", &format!("ROOT: \"<\" {want} \">\"")],
                "{gbnf}"
            );
        }
        // `x{0}` and `x{0,0}` match only the empty string.
        assert_eq!(root_term("root ::= \"a\" \"b\"{0} \"c\"{0,0}"), "\"a\"");
        assert_eq!(body("root ::= \"b\"{0}"), ["start: "]);
    }

    #[test]
    fn repetition_errors() {
        assert_eq!(
            err("root ::= \"a\"{3,2}"),
            "line 1, column 13: repetition {3,2} with m > n"
        );
        assert!(err("root ::= \"a\"{2001}").contains("limit of 2000"));
        // llama.cpp refuses a repetition that generates 2000 rules or more.
        assert!(err("root ::= \"a\"{2000}").contains("too many rules"));
        assert!(err("root ::= \"a\"{0,2000}").contains("too many rules"));
        assert!(err("root ::= \"a\"{99999999999999999999999}").contains("is too large"));
        assert!(err("root ::= *").contains("repetition `*` has nothing to repeat"));
        assert!(err("root ::= \"a\" | +").contains("`+` has nothing to repeat"));
        assert!(err("root ::= \"\"?").contains("`?` has nothing to repeat"));
        assert!(err("root ::= []*").contains("nothing to repeat"));
        assert!(err("root ::= \"a\"{0}*").contains("nothing to repeat"));
        assert!(err("root ::= \"a\"{x}").contains("expected a number in the repetition"));
        assert!(err("root ::= \"a\"{1;}").contains("expected `,` or `}`"));
        assert!(err("root ::= \"a\"{1,2").contains("expected `}`"));
        // llama.cpp's limit on the rules that nested repetitions generate.
        assert!(err("root ::= (\"a\"{0,100}){0,100}").contains("too many rules"));
        assert!(err("root ::= \"a\"{10}{10}{10}{10}").contains("too many rules"));
        assert_eq!(body("root ::= \"a\"{10}{10}{10}").len(), 2);
    }

    #[test]
    fn layout_follows_llama_cpp() {
        // `|` at the end of a line continues the rule; `::=` may be followed by a newline;
        // newlines are free inside parentheses; comments anywhere blanks are.
        let g = "# top\r\nroot ::= # c\n  a |\n  b # end\na ::= (\"x\" # in\n | \"y\"\n)\nb ::= \"z\"\n";
        assert_eq!(
            body(g),
            [
                "start: ROOT",
                "ROOT: (A | B)",
                "A: (\"x\" | \"y\")",
                "B: \"z\""
            ]
        );
        assert_eq!(
            err("root ::= \"a\"\n  | \"b\""),
            "line 2, column 3: a line cannot start with `|`: outside parentheses a newline \
             ends the rule, so put the `|` at the end of the previous line"
        );
        assert_eq!(
            err("root ::= \"a\"\r\nb ::= c\r\n"),
            "line 2, column 7: undefined rule `c`"
        );
        assert!(err("root\n::= \"a\"").contains("expected `::=` after the rule name `root`"));
        assert!(err("root ::= \"a\" b ::= \"c\"").contains("must start on a new line"));
    }

    #[test]
    fn rule_names() {
        // Letters, digits and `-`; case matters; names are made valid and distinct.
        let g =
            "root ::= Foo-1 foo-1 9x\nFoo-1 ::= \"a\"\nfoo-1 ::= \"b\"\n9x ::= \"c\" root | \"d\"";
        let out = lark(g);
        for line in ["root: FOO-1 FOO-1_2 r_9x\n", "r_9x: (\"c\" root | \"d\")\n"] {
            assert!(out.contains(line), "{line:?} in\n{out}");
        }
        assert_eq!(
            err("root ::= my_rule"),
            "line 1, column 12: `_` is not allowed in rule names (llama.cpp accepts letters, \
             digits and `-`)"
        );
        assert!(err("my_rule ::= \"a\"").contains("`_` is not allowed"));
        assert!(err("_x ::= \"a\"").contains("`_` is not allowed"));
        // `start` is Lark's start rule: a GBNF rule of that name is renamed.
        let out = lark("root ::= \"(\" start\nstart ::= \")\" | \"[\" root");
        assert!(
            out.contains("start: root\nroot: \"(\" start_2\nstart_2: "),
            "{out}"
        );
    }

    #[test]
    fn rules_and_references() {
        assert_eq!(
            err("root ::= a b\na ::= \"x\""),
            "line 1, column 12: undefined rule `b`"
        );
        assert_eq!(
            err("x ::= \"a\""),
            "line 1, column 1: no `root` rule: GBNF grammars start at the rule named `root`"
        );
        assert_eq!(err(""), "line 1, column 1: empty grammar: no rules");
        // A later definition replaces an earlier one.
        assert_eq!(root_term("root ::= \"a\"\nroot ::= \"b\""), "\"b\"");
        // Unused rules are not emitted.
        assert_eq!(
            root_term("root ::= \"a\"\nunused ::= \"b\" unused"),
            "\"a\""
        );
        // A root that matches only "" or nothing at all.
        assert_eq!(body("root ::= \"\" | x\nx ::= "), ["start: "]);
        assert_eq!(
            body("root ::= \"a\" root"),
            ["start: /[^\\x{0}-\\x{10FFFF}]/"]
        );
    }

    #[test]
    fn left_recursion_as_llama_cpp_sees_it() {
        assert_eq!(
            err("root ::= \"x\"\nexpr ::= expr \"+\" | \"1\""),
            "line 2, column 1: left recursion in rule `expr`: llama.cpp refuses grammars where a \
             rule can reach itself again before matching a character"
        );
        assert!(err("root ::= a\na ::= b \"x\"\nb ::= \"\" | a").contains("left recursion"));
        assert!(err("root ::= e \"x\" | \"y\"\ne ::= | root").contains("left recursion"));
        // The helper rules llama.cpp generates decide, not the language: `x?*` and `x**`
        // are left-recursive, `(x?)*` and `x*?` are not.
        assert!(err("root ::= \"a\"?* \"b\"").contains("left recursion in rule `root`"));
        assert!(err("root ::= \"a\"** \"b\"").contains("left recursion"));
        assert!(err("root ::= (\"a\" | \"\")* \"b\"").contains("left recursion"));
        assert_eq!(
            body("root ::= (\"a\"?)* \"b\""),
            ["start: ROOT", "ROOT: (\"a\"?)* \"b\""]
        );
        assert_eq!(
            body("root ::= \"a\"*? \"b\""),
            ["start: ROOT", "ROOT: (\"a\"*)? \"b\""]
        );
        // Reachability does not matter (llama.cpp checks every rule), and neither does a
        // nullable rule without an empty alternative of its own.
        assert!(err("root ::= \"a\"\nx ::= x").contains("left recursion in rule `x`"));
        lark("root ::= n root \"x\" | \"y\"\nn ::= m\nm ::= \"\"");
        // Right recursion is fine.
        lark("root ::= \"a\" root | \"b\"");
    }

    #[test]
    fn tokens() {
        assert_eq!(
            body("root ::= <[12]> \"a\" !<[13]>"),
            ["start: root", "root: <[12]> \"a\" <[^13]>"]
        );
        assert_eq!(
            body("root ::= <|im_end|>"),
            ["start: root", "root: <|im_end|>"]
        );
        assert_eq!(
            body("root ::= (<[1]> | \"x\")+"),
            ["start: root", "root: (<[1]> | \"x\")+"]
        );
        assert!(err("root ::= !<think>").contains("negated token by name `!<think>`"));
        assert!(err("root ::= <a b>").contains("token `<a b>` cannot be expressed"));
        assert!(err("root ::= <>").contains("cannot be expressed"));
        assert!(err("root ::= <abc").contains("unterminated token"));
        assert!(err("root ::= <[x]>").contains("expected a token id"));
        assert!(err("root ::= <[12>").contains("expected `]>`"));
        assert!(err("root ::= <[4294967296]>").contains("too large"));
        assert!(err("root ::= ! <[1]>").contains("expected `<` after `!`"));
    }

    #[test]
    fn other_errors_name_the_construct() {
        assert_eq!(
            err("root ::= \"ab"),
            "line 1, column 10: unterminated string literal"
        );
        assert_eq!(
            err("root ::= [ab"),
            "line 1, column 10: unterminated character class"
        );
        assert_eq!(
            err("root ::= [a-"),
            "line 1, column 10: unterminated character class"
        );
        assert!(err("root ::= \"a\\")
            .contains("unterminated string literal (it ends with a lone `\\`)"));
        assert!(err("root ::= \"\\q\"").contains("unknown escape `\\q` in the string literal"));
        assert!(err("root ::= [\\u12]")
            .contains("escape `\\u` needs exactly 4 hex digits (in the character class)"));
        assert!(err("root ::= \"\\U0001F60\"").contains("escape `\\U` needs exactly 8 hex digits"));
        assert_eq!(
            err("root ::= (\"a\""),
            "line 1, column 10: unclosed `(`: missing `)`"
        );
        assert!(err("root ::= (\"a\" ]").contains("in the group opened at line 1, column 10"));
        assert_eq!(err("root ::= \"a\")"), "line 1, column 13: unbalanced `)`");
        assert!(err("root ::= \"a\" @").contains("unexpected `@` in the rule `root`"));
        assert!(err("root ::= \"a\"\n\u{0}").contains("line 2, column 1: NUL character"));
        assert!(err("::= \"a\"").contains("expected a rule name, found `:`"));
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(200), ")".repeat(200));
        assert!(err(&deep).contains("nested too deeply"));
        let deep = format!("root ::= \"a\"{}", "?".repeat(200));
        assert!(err(&deep).contains("nested too deeply"));
        // Columns count characters, not bytes.
        assert_eq!(
            err("root ::= \"é\" x"),
            "line 1, column 14: undefined rule `x`"
        );
    }

    #[test]
    fn without_analysis_budget_every_lexeme_is_one_character() {
        let gbnf = "root ::= \"[\" (item (\",\" item)*)? \"]\"\nitem ::= [a-z]+ | root";
        let ast = Parser::parse(gbnf).expect("parses");
        let g = Graph::build(&ast);
        let a = Analysis::new(&g);
        let sel = select_lexemes(&g, &a, 0);
        assert!(sel
            .lexemes
            .iter()
            .all(|&i| matches!(g.kinds[i], Kind::Chars(_))));
        let out = Emitter::new(&ast, &g, &a, &sel).emit();
        assert!(out.ends_with("\nitem: (/[a-z]/+ | root)\n"), "{out}");
        // With the budget, `[a-z]+` is a terminal.
        let out = lark(gbnf);
        assert!(
            out.contains("\nitem: (ITEM_15 | root)\nITEM_15: /[a-z]/+\n"),
            "{out}"
        );
    }

    #[test]
    fn regular_parts_become_terminals_only_where_greedy_lexing_is_exact() {
        // A regular grammar is one terminal.
        assert_eq!(
            body("root ::= [a-z]+ \"1\""),
            ["start: ROOT", "ROOT: /[a-z]/+ \"1\""]
        );
        // In a recursive grammar, `[0-9]+` followed by `1` cannot be a terminal (it would
        // swallow the `1`), while `[a-z]+` followed by `;` can.
        let out =
            lark("root ::= num \"1\" word \";\" root | \"x\"\nnum ::= [0-9]+\nword ::= [a-z]+");
        assert!(
            out.contains("root: (num \"1\" WORD \";\" root | \"x\")"),
            "{out}"
        );
        assert!(
            out.contains("num: /[0-9]/+\n") && out.contains("WORD: /[a-z]/+\n"),
            "{out}"
        );
        // A lexeme that could extend another one allowed at the same place is split:
        // `ab` would be read where the grammar needs `a` then `b...`.
        let out = lark("root ::= (\"a\" | \"ab\") \"c\" root | \"a\" \"bd\" root | \"e\"");
        assert!(!out.contains("\"ab\""), "{out}");
    }
}
