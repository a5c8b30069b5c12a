//! GBNF (llama.cpp's grammar format) to llguidance's Lark dialect.
//!
//! The parser follows llama.cpp's own (`src/llama-grammar.cpp`, `llama_grammar_parser`):
//! rule names of ASCII letters, digits and `-`; `::=`; alternatives with `|`; literals
//! `"..."` and character classes `[...]` / `[^...]` with the escapes `\x`, `\u`, `\U`,
//! `\t`, `\r`, `\n`, `\\`, `\"`, `\[`, `\]`; groups `( ... )`, in which newlines are
//! allowed; `.`; the repetitions `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`; `#` comments; a rule
//! ends at a newline (after `|` the next line continues it); a rule defined twice keeps its
//! last definition, as in llama.cpp; generation starts at `root`.
//!
//! GBNF matches characters one at a time, with no lexer. llguidance's Lark has a lexer
//! whose lexemes match greedily, which would change the language of a translated rule such
//! as `[a-z]* "x"` (the lexeme `[a-z]*` would swallow the `x`). So every character position
//! becomes its own one-character lexeme (a literal `"ab"` is the two lexemes `/a/ /b/`, a
//! class is one lexeme `/[...]/`), and everything above characters (sequences,
//! alternatives, groups, repetitions, recursion) stays in Lark's grammar rules, which
//! llguidance parses with an Earley parser that accepts every context-free grammar. The
//! accepted language is then exactly the GBNF grammar's.
//!
//! Token references (`<[123]>`, `<|eot_id|>`, newer llama.cpp) become llguidance's token
//! references; negated ones (`!<...>`) are refused.

use std::collections::HashMap;
use std::fmt::Write;

/// A GBNF grammar that cannot be translated: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GbnfError {
    /// 1-based line of the problem.
    pub line: usize,
    /// 1-based column (in characters) of the problem.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for GbnfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for GbnfError {}

/// Deepest nesting of parentheses accepted (the parser recurses once per level).
const MAX_NESTING: usize = 256;
/// Largest repetition count accepted in `{m,n}`.
const MAX_REPEAT: u32 = 10_000;

/// One element of a sequence.
#[derive(Debug, Clone)]
enum Item {
    /// One character of a literal.
    Char(char),
    /// A literal of several characters (repeated as a whole).
    Literal(Vec<char>),
    /// A character class: inclusive code-point ranges, possibly negated.
    Class {
        negated: bool,
        ranges: Vec<(u32, u32)>,
    },
    /// `.`: any character.
    Any,
    /// A rule, by its index in `Parser::names`.
    Ref(usize),
    /// `( ... )`: alternatives of sequences.
    Group(Vec<Vec<Item>>),
    /// An item repeated `min..=max` times (`max` None: unbounded).
    Repeat(Box<Item>, u32, Option<u32>),
    /// A token reference, written as llguidance writes it (`<[12]>`, `<|eot_id|>`).
    Token(String),
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    /// Rule names by index, and where each was first referenced or defined.
    names: Vec<(String, usize)>,
    index: HashMap<String, usize>,
    /// Each rule's alternatives, once defined.
    rules: Vec<Option<Vec<Vec<Item>>>>,
    depth: usize,
}

/// Translates a llama.cpp GBNF grammar into llguidance's Lark dialect (see the module
/// documentation for how), or says where and why it cannot.
///
/// ```
/// use etllm::grammar::gbnf::gbnf_to_lark;
///
/// let lark = gbnf_to_lark("root ::= \"yes\" | \"no\"").unwrap();
/// assert!(lark.starts_with("start: "));
/// let err = gbnf_to_lark("root ::= answer").unwrap_err();
/// assert_eq!(err.to_string(), "line 1, column 10: undefined rule `answer`");
/// ```
pub fn gbnf_to_lark(gbnf: &str) -> Result<String, GbnfError> {
    let mut p = Parser {
        src: gbnf,
        pos: 0,
        names: Vec::new(),
        index: HashMap::new(),
        rules: Vec::new(),
        depth: 0,
    };
    p.parse()?;
    let root = p.index.get("root").copied().ok_or_else(|| GbnfError {
        line: 1,
        column: 1,
        message: "the grammar has no `root` rule (generation starts there)".into(),
    })?;
    for (i, rule) in p.rules.iter().enumerate() {
        if rule.is_none() {
            let (name, at) = &p.names[i];
            return Err(p.error_at(*at, format!("undefined rule `{name}`")));
        }
    }
    Ok(p.emit(root))
}

impl Parser<'_> {
    fn error_at(&self, at: usize, message: String) -> GbnfError {
        let before = &self.src[..at.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        GbnfError {
            line,
            column,
            message,
        }
    }

    fn error(&self, message: impl Into<String>) -> GbnfError {
        self.error_at(self.pos, message.into())
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.src[self.pos..].chars().nth(n)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Spaces, tabs and `#` comments; newlines too when `newline_ok`.
    fn space(&mut self, newline_ok: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '#' => {
                    while !matches!(self.peek(), None | Some('\r' | '\n')) {
                        self.bump();
                    }
                }
                '\r' | '\n' if newline_ok => self.pos += 1,
                _ => break,
            }
        }
    }

    fn is_word(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '-'
    }

    fn name(&mut self) -> Result<String, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(Self::is_word) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(self.error(match self.peek() {
                Some(c) => format!("expecting a rule name, found {c:?}"),
                None => "expecting a rule name, found the end".into(),
            }));
        }
        Ok(self.src[start..self.pos].to_string())
    }

    fn symbol(&mut self, name: &str, at: usize) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        self.names.push((name.to_string(), at));
        self.rules.push(None);
        self.index.insert(name.to_string(), self.names.len() - 1);
        self.names.len() - 1
    }

    fn parse(&mut self) -> Result<(), GbnfError> {
        self.space(true);
        while self.peek().is_some() {
            self.rule()?;
        }
        Ok(())
    }

    fn rule(&mut self) -> Result<(), GbnfError> {
        let at = self.pos;
        let name = self.name()?;
        let id = self.symbol(&name, at);
        self.space(false);
        if !self.src[self.pos..].starts_with("::=") {
            return Err(self.error(format!("expecting `::=` after the rule name `{name}`")));
        }
        self.pos += 3;
        self.space(true);
        let alternatives = self.alternatives(false)?;
        match self.peek() {
            Some('\r') => {
                self.pos += 1;
                if self.peek() == Some('\n') {
                    self.pos += 1;
                }
            }
            Some('\n') => self.pos += 1,
            None => {}
            Some(c) => {
                return Err(self.error(format!(
                    "expecting the end of the line after rule `{name}`, found {c:?}"
                )))
            }
        }
        self.space(true);
        // As llama.cpp: a rule defined again is replaced.
        self.rules[id] = Some(alternatives);
        Ok(())
    }

    fn alternatives(&mut self, nested: bool) -> Result<Vec<Vec<Item>>, GbnfError> {
        let mut alternatives = vec![self.sequence(nested)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            self.space(true);
            alternatives.push(self.sequence(nested)?);
        }
        Ok(alternatives)
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Item>, GbnfError> {
        let mut items: Vec<Item> = Vec::new();
        while let Some(c) = self.peek() {
            let at = self.pos;
            match c {
                '"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    loop {
                        match self.peek() {
                            None => return Err(self.error_at(at, "unterminated literal".into())),
                            Some('"') => break,
                            Some(_) => chars.push(self.char()?),
                        }
                    }
                    self.pos += 1;
                    items.push(match chars.len() {
                        1 => Item::Char(chars[0]),
                        _ => Item::Literal(chars),
                    });
                }
                '[' => {
                    self.pos += 1;
                    let negated = self.peek() == Some('^');
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        match self.peek() {
                            None => {
                                return Err(self.error_at(at, "unterminated character class".into()))
                            }
                            Some(']') => break,
                            Some(_) => {
                                let low = self.char()? as u32;
                                let mut high = low;
                                if self.peek() == Some('-') && self.peek_at(1) != Some(']') {
                                    self.pos += 1;
                                    if self.peek().is_none() {
                                        return Err(self
                                            .error_at(at, "unterminated character class".into()));
                                    }
                                    high = self.char()? as u32;
                                }
                                if high < low {
                                    return Err(self.error_at(
                                        at,
                                        format!(
                                            "character range U+{low:04X}-U+{high:04X} ends \
                                             before it starts"
                                        ),
                                    ));
                                }
                                ranges.push((low, high));
                            }
                        }
                    }
                    self.pos += 1;
                    if ranges.is_empty() {
                        // llama.cpp would read `[]` as nothing at all and `[^]` as any
                        // character; both are surely mistakes.
                        return Err(self.error_at(at, "empty character class".into()));
                    }
                    items.push(Item::Class { negated, ranges });
                }
                '(' => {
                    self.pos += 1;
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        return Err(self.error(format!(
                            "parentheses nested deeper than {MAX_NESTING} levels"
                        )));
                    }
                    self.space(true);
                    let group = self.alternatives(true)?;
                    self.depth -= 1;
                    if self.peek() != Some(')') {
                        return Err(self.error_at(at, "unclosed `(`".into()));
                    }
                    self.pos += 1;
                    items.push(Item::Group(group));
                }
                '.' => {
                    self.pos += 1;
                    items.push(Item::Any);
                }
                '*' | '+' | '?' | '{' => {
                    let (min, max) = self.repetition()?;
                    let Some(last) = items.pop() else {
                        return Err(
                            self.error_at(at, format!("`{c}` must follow an item to repeat"))
                        );
                    };
                    items.push(Item::Repeat(Box::new(last), min, max));
                }
                '<' | '!' => items.push(self.token()?),
                c if Self::is_word(c) => {
                    let name = self.name()?;
                    items.push(Item::Ref(self.symbol(&name, at)));
                }
                _ => break,
            }
            self.space(nested);
        }
        Ok(items)
    }

    /// `*`, `+`, `?` or `{m}`, `{m,}`, `{m,n}`, as (min, max).
    fn repetition(&mut self) -> Result<(u32, Option<u32>), GbnfError> {
        match self.bump() {
            Some('*') => return Ok((0, None)),
            Some('+') => return Ok((1, None)),
            Some('?') => return Ok((0, Some(1))),
            _ => {}
        }
        let at = self.pos - 1;
        self.space(false);
        let min = self.count()?;
        self.space(false);
        let max = match self.bump() {
            Some('}') => Some(min),
            Some(',') => {
                self.space(false);
                let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    Some(self.count()?)
                } else {
                    None
                };
                self.space(false);
                if self.bump() != Some('}') {
                    return Err(self.error_at(at, "unclosed `{` repetition".into()));
                }
                max
            }
            _ => return Err(self.error_at(at, "expecting `}` or `,` in a `{` repetition".into())),
        };
        if let Some(max) = max {
            if max < min {
                return Err(self.error_at(at, format!("repetition {{{min},{max}}} has max < min")));
            }
        }
        Ok((min, max))
    }

    fn count(&mut self) -> Result<u32, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits = &self.src[start..self.pos];
        if digits.is_empty() {
            return Err(self.error("expecting a number in a `{` repetition"));
        }
        match digits.parse::<u32>() {
            Ok(n) if n <= MAX_REPEAT => Ok(n),
            _ => Err(self.error_at(
                start,
                format!("repetition count {digits} is larger than {MAX_REPEAT}"),
            )),
        }
    }

    /// A token reference: `<[123]>` or `<name>`; `!<...>` is refused.
    fn token(&mut self) -> Result<Item, GbnfError> {
        let at = self.pos;
        if self.peek() == Some('!') {
            return Err(self.error_at(
                at,
                "negated token references (`!<...>`) are not supported".into(),
            ));
        }
        let rest = &self.src[self.pos..];
        let end = rest
            .find('>')
            .filter(|&e| !rest[..e].contains(['\n', '\r']));
        let Some(end) = end else {
            return Err(self.error_at(at, "unterminated token reference `<...>`".into()));
        };
        let inner = &rest[1..end];
        let item = if let Some(id) = inner.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let id: u32 = id
                .parse()
                .map_err(|_| self.error_at(at, format!("bad token id in `<{inner}>`")))?;
            Item::Token(format!("<[{id}]>"))
        } else if !inner.is_empty() && !inner.contains(['<', '>', ' ', '\t']) {
            Item::Token(format!("<{inner}>"))
        } else {
            return Err(self.error_at(at, format!("bad token reference `<{inner}>`")));
        };
        self.pos += end + 1;
        Ok(item)
    }

    /// One character of a literal or class, escapes decoded.
    fn char(&mut self) -> Result<char, GbnfError> {
        let at = self.pos;
        let c = self
            .bump()
            .ok_or_else(|| self.error("unexpected end of the grammar"))?;
        if c != '\\' {
            return Ok(c);
        }
        let hex = |p: &mut Self, n: usize| -> Result<char, GbnfError> {
            let digits: String = p.src[p.pos..].chars().take(n).collect();
            if digits.len() != n || !digits.chars().all(|d| d.is_ascii_hexdigit()) {
                return Err(p.error_at(at, format!("expecting {n} hex digits after `\\`")));
            }
            p.pos += n;
            let value = u32::from_str_radix(&digits, 16).expect("hex digits");
            char::from_u32(value)
                .ok_or_else(|| p.error_at(at, format!("U+{value:04X} is not a Unicode character")))
        };
        match self.bump() {
            Some('x') => hex(self, 2),
            Some('u') => hex(self, 4),
            Some('U') => hex(self, 8),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            Some('n') => Ok('\n'),
            Some(c @ ('\\' | '"' | '[' | ']')) => Ok(c),
            Some(c) => Err(self.error_at(at, format!("unknown escape `\\{c}`"))),
            None => Err(self.error_at(at, "unexpected end of the grammar after `\\`".into())),
        }
    }

    /// The Lark grammar, starting at rule `root`.
    fn emit(&self, root: usize) -> String {
        let mut out = Emitter {
            lark: String::new(),
            extra: Vec::new(),
            names: &self.names,
        };
        let _ = writeln!(out.lark, "start: {}", rule_name(root, &self.names));
        for (i, rule) in self.rules.iter().enumerate() {
            let body = out.alternatives(rule.as_deref().unwrap_or(&[]));
            let _ = writeln!(out.lark, "{}: {body}", rule_name(i, &self.names));
        }
        let extra = std::mem::take(&mut out.extra);
        for (i, body) in extra.iter().enumerate() {
            let _ = writeln!(out.lark, "g{i}_: {body}");
        }
        out.lark
    }
}

/// The Lark name of rule `i`: lower case (upper case names are lexemes in Lark), unique.
fn rule_name(i: usize, names: &[(String, usize)]) -> String {
    format!("r{i}_{}", names[i].0.to_ascii_lowercase().replace('-', "_"))
}

struct Emitter<'n> {
    lark: String,
    /// Rules made for groups and repeated items, by index (`g<i>_`).
    extra: Vec<String>,
    names: &'n [(String, usize)],
}

impl Emitter<'_> {
    fn alternatives(&mut self, alternatives: &[Vec<Item>]) -> String {
        alternatives
            .iter()
            .map(|seq| {
                seq.iter()
                    .map(|item| self.item(item))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// A new rule with `body`; returns its name. Its slot is taken before the body is
    /// emitted, so nested groups get later numbers.
    fn synthesize(&mut self, body: impl FnOnce(&mut Self) -> String) -> String {
        let i = self.extra.len();
        self.extra.push(String::new());
        let text = body(self);
        self.extra[i] = text;
        format!("g{i}_")
    }

    fn item(&mut self, item: &Item) -> String {
        match item {
            Item::Char(c) => lexeme(&class_text(false, &[(*c as u32, *c as u32)])),
            Item::Literal(chars) => chars
                .iter()
                .map(|&c| lexeme(&class_text(false, &[(c as u32, c as u32)])))
                .collect::<Vec<_>>()
                .join(" "),
            Item::Class { negated, ranges } => lexeme(&class_text(*negated, ranges)),
            Item::Any => "/(?s:.)/".to_string(),
            Item::Ref(i) => rule_name(*i, self.names),
            Item::Token(t) => t.clone(),
            Item::Group(alternatives) => {
                let alternatives = alternatives.clone();
                self.synthesize(|e| e.alternatives(&alternatives))
            }
            Item::Repeat(inner, min, max) => {
                let base = match inner.as_ref() {
                    Item::Literal(_) | Item::Repeat(..) => {
                        let inner = inner.as_ref().clone();
                        self.synthesize(|e| e.item(&inner))
                    }
                    other => self.item(other),
                };
                match (min, max) {
                    (0, None) => format!("{base}*"),
                    (1, None) => format!("{base}+"),
                    (0, Some(1)) => format!("{base}?"),
                    (m, None) => format!("{base}{{{m},}}"),
                    (m, Some(n)) if m == n => format!("{base}{{{m}}}"),
                    (m, Some(n)) => format!("{base}{{{m},{n}}}"),
                }
            }
        }
    }
}

/// A one-character lexeme matching the regex character class `class`.
fn lexeme(class: &str) -> String {
    format!("/{class}/")
}

/// A regex character class for `ranges`, every character written as `\x{...}`.
fn class_text(negated: bool, ranges: &[(u32, u32)]) -> String {
    let mut s = String::from(if negated { "[^" } else { "[" });
    for &(low, high) in ranges {
        if low == high {
            let _ = write!(s, "\\x{{{low:X}}}");
        } else {
            let _ = write!(s, "\\x{{{low:X}}}-\\x{{{high:X}}}");
        }
    }
    s.push(']');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(gbnf: &str) -> String {
        gbnf_to_lark(gbnf).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_construct_and_its_place() {
        assert_eq!(err("root ::= x"), "line 1, column 10: undefined rule `x`");
        assert_eq!(
            err("a ::= \"x\""),
            "line 1, column 1: the grammar has no `root` rule (generation starts there)"
        );
        assert!(err("root ::= \"abc").contains("unterminated literal"));
        assert!(err("root ::= [a-z").contains("unterminated character class"));
        assert!(err("root ::= [z-a]").contains("ends before it starts"));
        assert!(err("root ::= []").contains("empty character class"));
        assert!(err("root ::= (\"a\"").contains("unclosed `(`"));
        assert!(err("root ::= * \"a\"").contains("must follow an item"));
        assert!(err("root ::= \"a\"{3,1}").contains("max < min"));
        assert!(err("root ::= \"a\"{,3}").contains("expecting a number"));
        assert!(err("root ::= \"a\"{99999999999}").contains("larger than"));
        assert!(err("root ::= \"\\q\"").contains("unknown escape `\\q`"));
        assert!(err("root ::= \"\\xZ1\"").contains("hex digits"));
        assert!(err("root ::= \"\\UFFFFFFFF\"").contains("not a Unicode character"));
        assert!(err("root ::= \"\\uD800\"").contains("not a Unicode character"));
        assert!(err("root = \"a\"").contains("expecting `::=`"));
        assert!(err("root ::= \"a\" )").contains("expecting the end of the line"));
        assert!(err("root ::= !<x>").contains("negated token references"));
        assert_eq!(
            err("root ::= \"a\"\n\nb ::= c"),
            "line 3, column 7: undefined rule `c`"
        );
    }

    #[test]
    fn never_panics_on_garbage() {
        let samples = [
            "",
            "::=",
            "root",
            "root ::=",
            "root ::= \\",
            "root ::= \"\\",
            "root ::= [\\",
            "root ::= [a-",
            "root ::= <",
            "root ::= <[x]>",
            "root ::= {",
            "root ::= \"a\"{",
            "root ::= \"a\"{1",
            "root ::= \"a\"{1,",
            "é ::= \"a\"",
            "root ::= \"\u{10FFFF}\"",
            "root ::= ((((",
            "root ::= \"a\" |",
            "root ::= | | |",
            "\u{0}",
            "root ::= [^]",
        ];
        for s in samples {
            let _ = gbnf_to_lark(s);
        }
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(err(&deep).contains("nested deeper"));
    }

    #[test]
    fn each_character_is_its_own_lexeme() {
        let lark = gbnf_to_lark("root ::= \"ab\" [^x-z] .").unwrap();
        assert_eq!(
            lark,
            "start: r0_root\nr0_root: /[\\x{61}]/ /[\\x{62}]/ /[^\\x{78}-\\x{7A}]/ /(?s:.)/\n"
        );
    }

    #[test]
    fn groups_repetitions_and_names_become_rules() {
        let lark =
            gbnf_to_lark("root ::= (My-Rule | \"x\")* \"ab\"{2,3} [0-9]{1,}\nMy-Rule ::= \"q\"?\n")
                .unwrap();
        assert_eq!(
            lark,
            "start: r0_root\n\
             r0_root: g0_* g1_{2,3} /[\\x{30}-\\x{39}]/+\n\
             r1_my_rule: /[\\x{71}]/?\n\
             g0_: r1_my_rule | /[\\x{78}]/\n\
             g1_: /[\\x{61}]/ /[\\x{62}]/\n"
        );
    }

    #[test]
    fn a_rule_defined_twice_keeps_its_last_definition() {
        let lark = gbnf_to_lark("root ::= \"a\"\nroot ::= \"b\"").unwrap();
        assert!(lark.contains("r0_root: /[\\x{62}]/"), "{lark}");
    }

    #[test]
    fn newlines_continue_a_rule_after_a_bar_and_inside_parentheses() {
        let lark =
            gbnf_to_lark("root ::= \"a\" |\n  \"b\"\nx ::= (\n \"c\"\n | \"d\" )\n").unwrap();
        assert!(
            lark.contains("r0_root: /[\\x{61}]/ | /[\\x{62}]/"),
            "{lark}"
        );
        assert!(lark.contains("g0_: /[\\x{63}]/ | /[\\x{64}]/"), "{lark}");
    }

    #[test]
    fn token_references_pass_through() {
        let lark = gbnf_to_lark("root ::= <[42]> \"a\" <|eot_id|>").unwrap();
        assert!(
            lark.contains("r0_root: <[42]> /[\\x{61}]/ <|eot_id|>"),
            "{lark}"
        );
    }
}
