//! The GBNF -> Lark translation (`etllm::grammar::gbnf`) checked against llama.cpp.
//!
//! tests/fixtures/gbnf/ holds llama.cpp's sample grammars and a few edge-case grammars;
//! samples.json holds llama.cpp's own verdicts on sample strings for each of them (made by
//! tools/fixtures/make_gbnf_samples.py, see the README there). Each grammar must either
//! translate, compile in llguidance and give llama.cpp's verdict on every sample, or be
//! refused with a message naming the construct, as listed in `TABLE`.
//!
//! llguidance is driven without a real tokenizer: toktrie's single-byte tokenizer has one
//! token per byte (plus a few special tokens), so a string is fed byte by byte and each
//! byte must be allowed by the token mask.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use etllm::grammar::gbnf::{gbnf_to_lark, GbnfError};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::ApproximateTokEnv;
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::Value;

/// How each fixture must come out of the translator.
enum Outcome {
    Translates,
    /// Refused, with a message containing this text.
    Refused(&'static str),
}

const TABLE: &[(&str, Outcome)] = &[
    // llama.cpp's published sample grammars (grammars/*.gbnf).
    ("arithmetic.gbnf", Outcome::Translates),
    ("c.gbnf", Outcome::Translates),
    ("chess.gbnf", Outcome::Translates),
    ("english.gbnf", Outcome::Translates),
    ("japanese.gbnf", Outcome::Translates),
    ("json.gbnf", Outcome::Translates),
    ("json_arr.gbnf", Outcome::Translates),
    ("list.gbnf", Outcome::Translates),
    // Grammars from llama.cpp's grammars/README.md (made by its json_schema_to_grammar.py).
    ("readme_age_email.gbnf", Outcome::Translates),
    ("readme_name_age.gbnf", Outcome::Translates),
    ("readme_summary.gbnf", Outcome::Translates),
    // Edge cases.
    ("edge_dot.gbnf", Outcome::Translates),
    ("edge_empty_alternatives.gbnf", Outcome::Translates),
    ("edge_greedy.gbnf", Outcome::Translates),
    ("edge_negated.gbnf", Outcome::Translates),
    ("edge_nested_repetition.gbnf", Outcome::Translates),
    ("edge_redefinition.gbnf", Outcome::Translates),
    ("edge_repetition.gbnf", Outcome::Translates),
    ("edge_syntax.gbnf", Outcome::Translates),
    ("edge_unicode.gbnf", Outcome::Translates),
    (
        "edge_left_recursion.gbnf",
        Outcome::Refused("line 2, column 1: left recursion in rule `root`"),
    ),
    (
        "edge_left_recursion_optional_star.gbnf",
        Outcome::Refused("line 3, column 1: left recursion in rule `root`"),
    ),
    (
        "edge_undefined_rule.gbnf",
        Outcome::Refused("line 2, column 14: undefined rule `missing`"),
    ),
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gbnf")
}

fn read_fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn samples() -> Value {
    serde_json::from_str(&read_fixture("samples.json")).expect("samples.json")
}

fn factory() -> ParserFactory {
    let env = ApproximateTokEnv::single_byte_env();
    let mut f = ParserFactory::new_simple(&env).expect("parser factory");
    f.set_stderr_log_level(0);
    f
}

fn compile(factory: &ParserFactory, lark: &str) -> Result<TokenParser, String> {
    factory
        .create_parser(TopLevelGrammar::from_lark(lark.to_string()))
        .map_err(|e| e.to_string())
}

/// llama.cpp's verdict on a string: complete match, viable prefix, or the index (in code
/// points) of the first character refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accept,
    Prefix,
    Reject(usize),
}

fn is_allowed(m: &mut Matcher, byte: u8) -> bool {
    if m.is_stopped() {
        return false;
    }
    match m.compute_mask() {
        Ok(mask) => mask.is_allowed(byte as u32),
        Err(_) => false,
    }
}

/// Feeds `input` byte by byte; a character is refused if any of its bytes is.
fn verdict(parser: &TokenParser, input: &str) -> Verdict {
    let mut m = Matcher::new(Ok(parser.deep_clone()));
    for (k, c) in input.chars().enumerate() {
        let mut buf = [0; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            if !is_allowed(&mut m, b) || m.consume_token(b as u32).is_err() {
                return Verdict::Reject(k);
            }
        }
    }
    if m.is_accepting().unwrap_or(false) {
        Verdict::Accept
    } else {
        Verdict::Prefix
    }
}

/// Runs `f` on another thread and fails if it takes longer than `secs` (a lexing bug can
/// make llguidance loop forever computing forced bytes).
fn with_timeout<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: timed out after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

#[test]
fn every_fixture_is_listed_and_has_reference_verdicts() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gbnf"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TABLE.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "every fixture grammar must be in TABLE");
    let s = samples();
    let mut with_verdicts: Vec<String> = s["grammars"]
        .as_object()
        .expect("grammars")
        .keys()
        .cloned()
        .collect();
    with_verdicts.sort();
    assert_eq!(
        on_disk, with_verdicts,
        "samples.json must cover every fixture"
    );
    assert_eq!(s["llama_cpp_commit"].as_str().map(str::len), Some(40));
}

#[test]
fn fixtures_translate_or_are_refused_as_listed() {
    let s = samples();
    for (name, outcome) in TABLE {
        let llama_ok = s["grammars"][name]["llama_cpp_accepts_grammar"]
            .as_bool()
            .expect("llama_cpp_accepts_grammar");
        match (outcome, gbnf_to_lark(&read_fixture(name))) {
            (Outcome::Translates, Ok(_)) => {
                assert!(llama_ok, "{name}: translated but llama.cpp refuses it")
            }
            (Outcome::Refused(msg), Err(e)) => {
                assert!(e.to_string().contains(msg), "{name}: refused with `{e}`");
                assert!(!llama_ok, "{name}: refused but llama.cpp accepts it");
            }
            (Outcome::Translates, Err(e)) => panic!("{name}: refused: {e}"),
            (Outcome::Refused(_), Ok(lark)) => panic!("{name}: translated:\n{lark}"),
        }
    }
}

#[test]
fn translated_fixtures_give_llama_cpp_verdicts() {
    let s = samples();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, outcome) in TABLE {
        if !matches!(outcome, Outcome::Translates) {
            continue;
        }
        let lark = gbnf_to_lark(&read_fixture(name)).expect("translates");
        let cases: Vec<(String, Verdict)> = s["grammars"][name]["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|c| {
                let input = c["input"].as_str().expect("input").to_string();
                let v = match c["verdict"].as_str().expect("verdict") {
                    "accept" => Verdict::Accept,
                    "prefix" => Verdict::Prefix,
                    "reject" => Verdict::Reject(c["reject_at"].as_u64().expect("at") as usize),
                    other => panic!("{name}: verdict {other}"),
                };
                (input, v)
            })
            .collect();
        let accepts = cases.iter().filter(|c| c.1 == Verdict::Accept).count();
        assert!(
            accepts >= 5 && cases.len() - accepts >= 5,
            "{name}: needs valid and invalid samples"
        );
        checked += cases.len();
        let lark2 = lark.clone();
        let got: Vec<Verdict> = with_timeout(name, 120, move || {
            let parser = compile(&factory(), &lark2).expect("compiles");
            cases.iter().map(|(i, _)| verdict(&parser, i)).collect()
        });
        for (case, got) in s["grammars"][name]["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .zip(got)
        {
            let input = case["input"].as_str().expect("input");
            let want = match case["verdict"].as_str().expect("verdict") {
                "accept" => Verdict::Accept,
                "prefix" => Verdict::Prefix,
                _ => Verdict::Reject(case["reject_at"].as_u64().expect("at") as usize),
            };
            if got != want {
                failures.push(format!(
                    "{name}: {input:?}: llama.cpp {want:?}, translation {got:?}\n{lark}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked > 250, "only {checked} samples");
}

/// The same samples as BPE tokens, which often span lexemes and sometimes end inside a
/// UTF-8 character: tokens before the first refused character must be allowed, the token
/// holding (a byte of) it must be the first one refused, and only complete matches may
/// end in an accepting state.
#[test]
fn translated_fixtures_give_llama_cpp_verdicts_with_a_bpe_tokenizer() {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_big.json"),
        )
        .expect("tokenizer_big.json"),
    )
    .expect("tokenizer json");
    let words = llguidance::token_bytes_from_tokenizer_json(&json).expect("token bytes");
    let info = llguidance::toktrie::TokRxInfo::new(words.len() as u32, 2);
    let trie = llguidance::toktrie::TokTrie::from(&info, &words);
    let env: llguidance::toktrie::TokEnv = std::sync::Arc::new(ApproximateTokEnv::new(trie));
    let s = samples();
    let mut cases = Vec::new();
    for (name, outcome) in TABLE {
        if !matches!(outcome, Outcome::Translates) {
            continue;
        }
        let lark = gbnf_to_lark(&read_fixture(name)).expect("translates");
        for c in s["grammars"][name]["samples"].as_array().expect("samples") {
            let input = c["input"].as_str().expect("input").to_string();
            let want = match c["verdict"].as_str().expect("verdict") {
                "accept" => Verdict::Accept,
                "prefix" => Verdict::Prefix,
                _ => Verdict::Reject(c["reject_at"].as_u64().expect("at") as usize),
            };
            cases.push((name.to_string(), lark.clone(), input, want));
        }
    }
    let (failures, multi_byte) =
        with_timeout("BPE samples", 300, move || {
            let mut f = ParserFactory::new_simple(&env).expect("factory");
            f.set_stderr_log_level(0);
            let trie = env.tok_trie();
            let mut parsers: HashMap<String, TokenParser> = HashMap::new();
            let mut failures = Vec::new();
            let mut multi_byte = 0;
            for (name, lark, input, want) in &cases {
                let parser = parsers
                    .entry(name.clone())
                    .or_insert_with(|| compile(&f, lark).expect("compiles"));
                let tokens = trie.greedy_tokenize(input.as_bytes());
                multi_byte += tokens.iter().filter(|&&t| trie.token(t).len() > 1).count();
                // Byte range of the first refused character.
                let bad = match want {
                    Verdict::Reject(k) => {
                        let start = input.char_indices().nth(*k).expect("char").0;
                        let len = input[start..].chars().next().expect("char").len_utf8();
                        Some(start..start + len)
                    }
                    _ => None,
                };
                let mut m = Matcher::new(Ok(parser.deep_clone()));
                let mut offset = 0;
                let mut refused_at = None;
                for &t in &tokens {
                    let allowed = !m.is_stopped()
                        && m.compute_mask()
                            .map(|mask| mask.is_allowed(t))
                            .unwrap_or(false);
                    if !allowed || m.consume_token(t).is_err() {
                        refused_at = Some(offset..offset + trie.token(t).len());
                        break;
                    }
                    offset += trie.token(t).len();
                }
                let ok = match (&bad, &refused_at) {
                    (None, None) => m.is_accepting().unwrap_or(false) == (*want == Verdict::Accept),
                    (Some(b), Some(r)) => r.start < b.end && b.start < r.end,
                    _ => false,
                };
                if !ok {
                    failures.push(format!(
                    "{name}: {input:?} as {:?}: llama.cpp {want:?}, refused bytes {refused_at:?}",
                    tokens.iter().map(|&t| trie.token_dbg(t)).collect::<Vec<_>>()
                ));
                }
            }
            (failures, multi_byte)
        });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(multi_byte > 200, "only {multi_byte} multi-byte tokens");
}

/// The point of the lexeme analysis: where it is safe, GBNF rules become single terminals
/// (llguidance then only runs its Earley parser at their boundaries).
#[test]
fn sample_grammars_get_long_lexemes() {
    let chess = gbnf_to_lark(&read_fixture("chess.gbnf")).expect("chess");
    assert!(chess.contains("start: ROOT\n"), "{chess}");
    let list = gbnf_to_lark(&read_fixture("list.gbnf")).expect("list");
    assert!(list.contains("start: ROOT\n"), "{list}");
    let json = gbnf_to_lark(&read_fixture("json.gbnf")).expect("json");
    for line in ["\nSTRING: ", "\nNUMBER: ", "\nWS: "] {
        assert!(json.contains(line), "{line:?} in\n{json}");
    }
    // ... and where it is not, they do not: in c.gbnf, `int ` would be read as the start
    // of a `dataType` even where it is an identifier (`int = 5;`).
    let c = gbnf_to_lark(&read_fixture("c.gbnf")).expect("c");
    assert!(c.contains("\ndatatype: "), "{c}");
}

#[test]
fn tokens_become_llguidance_special_tokens() {
    // The single-byte tokenizer: ids 0-255 are bytes; 256.. are <|tool|>, <|/tool|>,
    // <|user|>, <|system|>, <|assistant|>, <|end|> (EOS).
    let cases: &[(&str, Vec<u32>, bool)] = &[
        (
            "root ::= \"a\" <[258]> \"b\"",
            vec![b'a' as u32, 258, b'b' as u32],
            true,
        ),
        (
            "root ::= \"a\" <[258]> \"b\"",
            vec![b'a' as u32, 259],
            false,
        ),
        (
            "root ::= \"a\" <|user|> \"b\"",
            vec![b'a' as u32, 258, b'b' as u32],
            true,
        ),
        (
            "root ::= \"a\" !<[258]> \"b\"",
            vec![b'a' as u32, b'x' as u32, b'b' as u32],
            true,
        ),
        (
            "root ::= \"a\" !<[258]> \"b\"",
            vec![b'a' as u32, 259, b'b' as u32],
            true,
        ),
        (
            "root ::= \"a\" !<[258]> \"b\"",
            vec![b'a' as u32, 258],
            false,
        ),
        (
            "root ::= <[256]> (\"x\" | <[257]>)*",
            vec![256, b'x' as u32, 257, b'x' as u32],
            true,
        ),
        // A multi-character terminal ends where a token comes.
        (
            "root ::= [a-z]+ <[258]> \"b\"",
            vec![b'a' as u32, b'b' as u32, 258, b'b' as u32],
            true,
        ),
        ("root ::= [a-z]+ <[258]> \"b\"", vec![258], false),
    ];
    for (gbnf, tokens, ok) in cases {
        let lark = gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf}: {e}"));
        let parser = compile(&factory(), &lark).unwrap_or_else(|e| panic!("{lark}: {e}"));
        let mut m = Matcher::new(Ok(parser));
        let mut all = true;
        for &t in tokens {
            let allowed = !m.is_stopped()
                && m.compute_mask()
                    .map(|mask| mask.is_allowed(t))
                    .unwrap_or(false);
            if !allowed || m.consume_token(t).is_err() {
                all = false;
                break;
            }
        }
        let accepted = all && m.is_accepting().unwrap_or(false);
        assert_eq!(accepted, *ok, "{gbnf} on {tokens:?}:\n{lark}");
    }
}

#[test]
fn refusals_name_the_construct_and_its_place() {
    let cases: &[(&str, &str)] = &[
        ("root ::= foo\n", "line 1, column 10: undefined rule `foo`"),
        (
            "root ::= [a-z\n",
            "line 1, column 10: unterminated character class",
        ),
        (
            "root ::= \"abc\n",
            "line 1, column 10: unterminated string literal",
        ),
        (
            "root ::= \"a\"{3,2}",
            "line 1, column 13: repetition {3,2} with m > n",
        ),
        (
            "\n\nroot ::= x\nx ::= (\"a\"",
            "line 4, column 7: unclosed `(`",
        ),
        (
            "root ::= my_rule\n",
            "line 1, column 12: `_` is not allowed in rule names",
        ),
        (
            "root ::= \"a\"\n  | \"b\"\n",
            "line 2, column 3: a line cannot start with `|`",
        ),
        (
            "root ::= \"\\q\"",
            "line 1, column 11: unknown escape `\\q`",
        ),
        (
            "root ::= \"\\x4\"",
            "line 1, column 11: escape `\\x` needs exactly 2 hex digits",
        ),
        (
            "root ::= * \"a\"",
            "line 1, column 10: repetition `*` has nothing to repeat",
        ),
        (
            "root ::= \"\"+",
            "line 1, column 12: repetition `+` has nothing to repeat",
        ),
        (
            "root ::= \"a\"{2001}",
            "the minimum exceeds llama.cpp's limit of 2000",
        ),
        (
            "root ::= !<think>",
            "negated token by name `!<think>` is not supported",
        ),
        (
            "root ::= <[99999999999]>",
            "token id 99999999999 in `<[...]>` is too large",
        ),
        ("x ::= \"a\"\n", "no `root` rule"),
        ("", "empty grammar"),
        ("# only a comment\n", "empty grammar"),
        (
            "root ::= expr\nexpr ::= expr \"+\" \"1\" | \"1\"",
            "left recursion in rule `expr`",
        ),
        (
            "root ::= \"a\" ::= \"b\"",
            "each rule definition must start on a new line",
        ),
        ("root ::= \"a\")", "line 1, column 13: unbalanced `)`"),
        (
            "root \"a\"",
            "line 1, column 6: expected `::=` after the rule name `root`",
        ),
        ("root ::= \"a\"\0", "NUL character"),
    ];
    for (gbnf, want) in cases {
        match gbnf_to_lark(gbnf) {
            Ok(lark) => panic!("{gbnf:?} translated:\n{lark}"),
            Err(e) => assert!(
                e.to_string().contains(want),
                "{gbnf:?}: `{e}`, want `{want}`"
            ),
        }
    }
    let e: GbnfError = gbnf_to_lark("root ::= x").unwrap_err();
    assert_eq!((e.line, e.column), (1, 10));
    let _: &dyn std::error::Error = &e;
}

// ---------------------------------------------------------------------------------------
// Robustness: never panic, and produce Lark that llguidance compiles.
// ---------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

#[test]
fn truncated_and_garbled_grammars_never_panic() {
    let mut inputs: Vec<String> = Vec::new();
    for (name, _) in TABLE {
        // Every prefix of the small grammars; about 600 of each large one.
        let text = read_fixture(name);
        let step = text.len().div_ceil(600);
        for (k, _) in text.char_indices().step_by(step) {
            inputs.push(text[..k].to_string());
        }
    }
    let alphabet: Vec<char> = "ab ::=|()[]^-\\\"*+?{},.#<>!_\nxuU0123456789é\u{1F600}\r\t"
        .chars()
        .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3000 {
        let len = rng.below(40);
        let mut s = String::from(if rng.chance(70) { "root ::= " } else { "" });
        for _ in 0..len {
            s.push(alphabet[rng.below(alphabet.len())]);
        }
        inputs.push(s);
    }
    for (name, _) in TABLE {
        let text: Vec<char> = read_fixture(name).chars().collect();
        for _ in 0..100 {
            let mut t = text.clone();
            for _ in 0..1 + rng.below(3) {
                let k = rng.below(t.len().max(1));
                match rng.below(3) {
                    0 if !t.is_empty() => {
                        t.remove(k);
                    }
                    1 => t.insert(k.min(t.len()), alphabet[rng.below(alphabet.len())]),
                    _ if !t.is_empty() => t[k] = alphabet[rng.below(alphabet.len())],
                    _ => {}
                }
            }
            inputs.push(t.into_iter().collect());
        }
    }
    // Deep nesting and huge counts.
    inputs.push(format!(
        "root ::= {}\"a\"{}",
        "(".repeat(100_000),
        ")".repeat(100_000)
    ));
    inputs.push(format!(
        "root ::= {}\"a\"{}",
        "(".repeat(99),
        ")".repeat(99)
    ));
    inputs.push(format!("root ::= \"a\"{}", "?".repeat(100_000)));
    inputs.push(format!("root ::= \"a\"{}", "*".repeat(50)));
    inputs.push("root ::= \"a\"{99999999999999999999999}".to_string());
    inputs.push("root ::= \"a\"{0,99999999999999999999}".to_string());
    inputs.push("root ::= \"a\"{2000} \"b\"{0,2000}".to_string());
    inputs.push("root ::= ((\"a\"{0,40}){0,40}){0,40}".to_string());
    inputs
        .push("root ::= [\\xFF\\xFE] \"\\xFF\" [\\U0010FFFF-\\UFFFFFFFF] \"\\uD800\"".to_string());
    let chain: String = (0..3000)
        .map(|k| format!("r{k} ::= \"x\" r{}\n", k + 1))
        .collect();
    inputs.push(format!("root ::= r0\n{chain}r3000 ::= \"y\"\n"));
    let wide: String = (0..3000).map(|k| format!("r{k} ::= \"x{k}\"\n")).collect();
    let refs: Vec<String> = (0..3000).map(|k| format!("r{k}")).collect();
    inputs.push(format!("root ::= ({})*\n{wide}", refs.join(" | ")));

    let results = with_timeout("garbled grammars", 600, move || {
        let mut ok = Vec::new();
        let mut refused = 0;
        for input in &inputs {
            match std::panic::catch_unwind(|| gbnf_to_lark(input)) {
                Ok(Ok(lark)) => ok.push((input.clone(), lark)),
                Ok(Err(e)) => {
                    assert!(e.line >= 1 && e.column >= 1 && !e.message.is_empty());
                    refused += 1;
                }
                Err(_) => panic!("gbnf_to_lark panicked on {input:?}"),
            }
        }
        (ok, refused)
    });
    let (ok, refused) = results;
    assert!(
        ok.len() > 500 && refused > 500,
        "{} ok, {refused} refused",
        ok.len()
    );
    // Whatever translates must compile (a sample of them: compiling takes a while).
    let sample: Vec<(String, String)> = ok.into_iter().step_by(7).collect();
    with_timeout("compiling translations", 600, move || {
        let f = factory();
        for (gbnf, lark) in &sample {
            if let Err(e) = compile(&f, lark) {
                // llguidance's own limits (grammar size, lexer states) are not our bugs.
                assert!(
                    e.contains("limit") || e.contains("too large") || e.contains("too many"),
                    "{gbnf:?} -> {lark}\ndoes not compile: {e}"
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// Random grammars against an independent GBNF matcher
// ---------------------------------------------------------------------------------------

/// A generated grammar expression; rendered to GBNF text for the translator and matched
/// directly by `ends` (a backtracking-free set-of-positions matcher, which knows nothing
/// about lexemes).
#[derive(Debug, Clone)]
enum G {
    Lit(Vec<char>),
    Class(Vec<(char, char)>, bool),
    Any,
    Ref(usize),
    Seq(Vec<G>),
    Alt(Vec<G>),
    Rep(Box<G>, u32, Option<u32>),
}

const ALPHABET: [char; 4] = ['a', 'b', 'c', ' '];

fn gen_expr(rng: &mut Rng, rule: usize, rules: usize, depth: usize) -> G {
    let leaf = depth >= 3 || rng.chance(35);
    if leaf {
        return match rng.below(10) {
            0..=3 => G::Lit(
                (0..1 + rng.below(3))
                    .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                    .collect(),
            ),
            4..=6 => {
                let a = ALPHABET[rng.below(3)];
                let b = ALPHABET[rng.below(3)];
                let mut ranges = vec![(a.min(b), a.max(b))];
                if rng.chance(40) {
                    ranges.push((' ', ' '));
                }
                G::Class(ranges, rng.chance(25))
            }
            7 if rule + 1 < rules => G::Ref(rule + 1 + rng.below(rules - rule - 1)),
            8 if rng.chance(30) => G::Any,
            _ => G::Lit(vec![ALPHABET[rng.below(3)]]),
        };
    }
    match rng.below(3) {
        0 => G::Seq(
            (0..2 + rng.below(2))
                .map(|_| gen_expr(rng, rule, rules, depth + 1))
                .collect(),
        ),
        1 => G::Alt(
            (0..2 + rng.below(2))
                .map(|_| gen_expr(rng, rule, rules, depth + 1))
                .collect(),
        ),
        _ => {
            let (min, max) = match rng.below(6) {
                0 => (0, None),
                1 => (1, None),
                2 => (0, Some(1)),
                3 => (2, None),
                4 => (1, Some(2)),
                _ => (0, Some(3)),
            };
            G::Rep(Box::new(gen_expr(rng, rule, rules, depth + 1)), min, max)
        }
    }
}

fn gen_grammar(rng: &mut Rng) -> Vec<G> {
    let rules = 1 + rng.below(4);
    (0..rules)
        .map(|r| {
            let mut alts = vec![gen_expr(rng, r, rules, 0)];
            if rng.chance(60) {
                // Recursion (to this rule or an earlier one), guarded by a character so
                // that it is not left recursion.
                let target = rng.below(r + 1);
                let mut seq = vec![G::Lit(vec![ALPHABET[rng.below(3)]])];
                if rng.chance(70) {
                    seq.push(gen_expr(rng, r, rules, 1));
                }
                seq.push(G::Ref(target));
                if rng.chance(50) {
                    seq.push(gen_expr(rng, r, rules, 2));
                }
                alts.push(G::Seq(seq));
            }
            if rng.chance(15) {
                alts.push(G::Seq(Vec::new()));
            }
            G::Alt(alts)
        })
        .collect()
}

fn rule_name(r: usize) -> String {
    if r == 0 {
        "root".to_string()
    } else {
        format!("r{r}")
    }
}

fn gbnf_char(c: char) -> String {
    match c {
        '"' | '\\' | '[' | ']' => format!("\\{c}"),
        _ => c.to_string(),
    }
}

fn render(g: &G, atom: bool) -> String {
    let s = match g {
        G::Lit(cs) => {
            return format!(
                "\"{}\"",
                cs.iter().map(|&c| gbnf_char(c)).collect::<String>()
            )
        }
        G::Class(ranges, neg) => {
            let body: String = ranges
                .iter()
                .map(|&(a, b)| {
                    if a == b {
                        gbnf_char(a)
                    } else {
                        format!("{}-{}", gbnf_char(a), gbnf_char(b))
                    }
                })
                .collect();
            return format!("[{}{body}]", if *neg { "^" } else { "" });
        }
        G::Any => return ".".to_string(),
        G::Ref(r) => return rule_name(*r),
        G::Seq(items) if items.is_empty() => "\"\"".to_string(),
        G::Seq(items) => items
            .iter()
            .map(|i| render(i, true))
            .collect::<Vec<_>>()
            .join(" "),
        G::Alt(alts) => alts
            .iter()
            .map(|a| render(a, false))
            .collect::<Vec<_>>()
            .join(" | "),
        G::Rep(x, min, max) => {
            let suffix = match (min, max) {
                (0, None) => "*".to_string(),
                (1, None) => "+".to_string(),
                (0, Some(1)) => "?".to_string(),
                (m, None) => format!("{{{m},}}"),
                (m, Some(n)) => format!("{{{m},{n}}}"),
            };
            // Parenthesized, so that repetitions never stack directly.
            return format!("({}){suffix}", render(x, false));
        }
    };
    if atom {
        format!("({s})")
    } else {
        s
    }
}

fn render_grammar(rules: &[G]) -> String {
    rules
        .iter()
        .enumerate()
        .map(|(r, g)| format!("{} ::= {}\n", rule_name(r), render(g, false)))
        .collect()
}

struct Matcher2<'a> {
    rules: &'a [G],
    input: &'a [char],
    memo: HashMap<(usize, usize), BTreeSet<usize>>,
}

impl Matcher2<'_> {
    /// Every position where a match of `g` starting at `pos` can end.
    fn ends(&mut self, g: &G, pos: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        match g {
            G::Lit(cs) => {
                if self.input[pos..].starts_with(cs) {
                    out.insert(pos + cs.len());
                }
            }
            G::Class(ranges, neg) => {
                if let Some(&c) = self.input.get(pos) {
                    if ranges.iter().any(|&(a, b)| a <= c && c <= b) != *neg {
                        out.insert(pos + 1);
                    }
                }
            }
            G::Any => {
                if pos < self.input.len() {
                    out.insert(pos + 1);
                }
            }
            G::Ref(r) => {
                if let Some(v) = self.memo.get(&(*r, pos)) {
                    return v.clone();
                }
                let body = &self.rules[*r];
                out = self.ends(body, pos);
                self.memo.insert((*r, pos), out.clone());
            }
            G::Seq(items) => {
                out.insert(pos);
                for i in items {
                    let mut next = BTreeSet::new();
                    for p in out {
                        next.extend(self.ends(i, p));
                    }
                    out = next;
                }
            }
            G::Alt(alts) => {
                for a in alts {
                    out.extend(self.ends(a, pos));
                }
            }
            G::Rep(x, min, max) => {
                // Positions after exactly k repetitions, for k up to the minimum; after
                // that every further repetition also counts.
                let mut cur: BTreeSet<usize> = [pos].into();
                for _ in 0..*min {
                    let mut next = BTreeSet::new();
                    for p in &cur {
                        next.extend(self.ends(x, *p));
                    }
                    cur = next;
                }
                out.extend(cur.iter().copied());
                let extra = max.map(|m| (m - min) as usize);
                let mut frontier = cur;
                let mut k = 0;
                while !frontier.is_empty() && extra.is_none_or(|e| k < e) {
                    k += 1;
                    let mut next = BTreeSet::new();
                    for p in &frontier {
                        next.extend(self.ends(x, *p));
                    }
                    frontier = if extra.is_none() {
                        next.difference(&out).copied().collect()
                    } else {
                        next.clone()
                    };
                    out.extend(next);
                }
            }
        }
        out
    }
}

fn reference_accepts(rules: &[G], input: &str) -> bool {
    let chars: Vec<char> = input.chars().collect();
    let mut m = Matcher2 {
        rules,
        input: &chars,
        memo: HashMap::new(),
    };
    m.ends(&G::Ref(0), 0).contains(&chars.len())
}

/// A random string of the grammar's language (or nothing, if the derivation ran too deep).
fn derive(rng: &mut Rng, rules: &[G], g: &G, depth: usize, out: &mut String) -> bool {
    if depth > 12 || out.len() > 40 {
        return false;
    }
    match g {
        G::Lit(cs) => out.extend(cs.iter()),
        G::Class(ranges, neg) => {
            let options: Vec<char> = ALPHABET
                .iter()
                .chain(['x', 'é'].iter())
                .copied()
                .filter(|&c| ranges.iter().any(|&(a, b)| a <= c && c <= b) != *neg)
                .collect();
            if options.is_empty() {
                return false;
            }
            out.push(options[rng.below(options.len())]);
        }
        G::Any => out.push(['a', 'z', '\n', 'é'][rng.below(4)]),
        G::Ref(r) => return derive(rng, rules, &rules[*r], depth + 1, out),
        G::Seq(items) => {
            for i in items {
                if !derive(rng, rules, i, depth + 1, out) {
                    return false;
                }
            }
        }
        G::Alt(alts) => {
            let k = rng.below(alts.len());
            return derive(rng, rules, &alts[k], depth + 1, out);
        }
        G::Rep(x, min, max) => {
            let n = *min as usize + rng.below(max.map_or(3, |m| (m - min) as usize + 1));
            for _ in 0..n {
                if !derive(rng, rules, x, depth + 1, out) {
                    return false;
                }
            }
        }
    }
    true
}

#[test]
fn random_grammars_match_an_independent_matcher() {
    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
    let mut cases = Vec::new();
    for _ in 0..600 {
        let rules = gen_grammar(&mut rng);
        let text = render_grammar(&rules);
        let mut strings: Vec<String> = Vec::new();
        for _ in 0..12 {
            let mut s = String::new();
            if derive(&mut rng, &rules, &G::Ref(0), 0, &mut s) {
                strings.push(s.clone());
                // Mutations of valid strings.
                let mut t: Vec<char> = s.chars().collect();
                let k = rng.below(t.len() + 1);
                match rng.below(3) {
                    0 if k < t.len() => {
                        t.remove(k);
                    }
                    1 => t.insert(k, ALPHABET[rng.below(ALPHABET.len())]),
                    _ => t.push(ALPHABET[rng.below(3)]),
                }
                strings.push(t.into_iter().collect());
            }
        }
        for _ in 0..4 {
            strings.push(
                (0..rng.below(6))
                    .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                    .collect(),
            );
        }
        strings.sort();
        strings.dedup();
        cases.push((rules, text, strings));
    }
    let (translated, failures, stats, counts) = with_timeout("random grammars", 900, move || {
        let f = factory();
        let mut translated = 0;
        let mut failures = Vec::new();
        let (mut accepted, mut total, mut with_terminals, mut split) = (0, 0, 0, 0);
        for (rules, text, strings) in &cases {
            let lark = match gbnf_to_lark(text) {
                Ok(l) => l,
                Err(e) => {
                    // Only llama.cpp's own refusals are expected here.
                    assert!(e.message.contains("left recursion"), "{text}: {e}");
                    continue;
                }
            };
            translated += 1;
            if lark
                .lines()
                .any(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
            {
                with_terminals += 1;
            }
            if lark.lines().count() > 2 && !lark.contains("start: ROOT") {
                split += 1;
            }
            let parser = compile(&f, &lark).unwrap_or_else(|e| panic!("{text}\n{lark}\n{e}"));
            for s in strings {
                let want = reference_accepts(rules, s);
                let got = verdict(&parser, s) == Verdict::Accept;
                total += 1;
                accepted += want as usize;
                if want != got {
                    failures.push(format!(
                        "{text}{s:?}: reference {want}, translation {got}\n{lark}"
                    ));
                }
            }
        }
        let stats = format!(
            "{translated} grammars translated, {with_terminals} with terminals, {split} \
             recursive; {accepted} of {total} strings accepted"
        );
        (
            translated,
            failures,
            stats,
            [accepted, total - accepted, with_terminals, split],
        )
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Not vacuous: many grammars, both verdicts, and recursive grammars (where lexeme
    // boundaries matter) with multi-character terminals.
    assert!(
        translated > 500 && counts.iter().all(|&c| c > 250),
        "{stats}"
    );
    eprintln!("{stats}");
}
