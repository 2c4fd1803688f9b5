//! Unit tests of the rule engine: every API function, the sandbox limits,
//! `state`, and reload semantics, without a gateway.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::model::{CommandResult, Qos, Quality, Reading, Value};

/// Generous, so that a loaded CI machine running a debug build never hits
/// it by accident; the test of the deadline itself sets a short one.
const DEADLINE: Duration = Duration::from_millis(1000);

fn rules(files: &[(&str, &str)]) -> Rules {
    match try_rules(files) {
        Ok(r) => r,
        Err(e) => panic!("rules did not compile:\n{e}"),
    }
}

fn try_rules(files: &[(&str, &str)]) -> Result<Rules, RuleErrors> {
    Rules::from_sources(sources(files), DEADLINE)
}

fn sources(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    files
        .iter()
        .map(|(n, t)| (PathBuf::from(format!("rules/{n}")), t.to_string()))
        .collect()
}

fn reading(point: &str, value: Value) -> Reading {
    Reading {
        device: Arc::from("pv"),
        point: Arc::from(point),
        value,
        unit: Some(Arc::from("W")),
        ts: 1_000,
        quality: Quality::Good,
    }
}

fn text(m: &crate::model::Message) -> &str {
    std::str::from_utf8(&m.payload).unwrap()
}

#[test]
fn on_reading_can_change_drop_or_pass_a_reading() {
    let r = rules(&[(
        "a.rhai",
        r#"
        fn on_reading(r) {
            if r.point == "power" { r.value = r.value / 1000.0; r.unit = "kW"; return r; }
            if r.point == "noise" { return false; }
        }
        "#,
    )]);
    let out = r.on_reading(&reading("power", Value::Float(2500.0)));
    let Verdict::Changed(changed) = out.verdict else {
        panic!("expected a change, got {:?}", out.verdict)
    };
    assert_eq!(changed.value, Value::Float(2.5));
    assert_eq!(changed.unit.as_deref(), Some("kW"));
    assert_eq!(
        r.on_reading(&reading("noise", Value::Int(1))).verdict,
        Verdict::Dropped
    );
    assert_eq!(
        r.on_reading(&reading("other", Value::Int(1))).verdict,
        Verdict::Unchanged
    );
}

#[test]
fn files_run_in_name_order_and_see_each_others_changes() {
    let r = rules(&[
        ("10-scale.rhai", "fn on_reading(r) { r.value *= 2; r }"),
        (
            "20-report.rhai",
            r#"fn on_reading(r) { publish("seen", r.value); }"#,
        ),
    ]);
    let out = r.on_reading(&reading("x", Value::Int(21)));
    assert_eq!(text(&out.outcome.publishes[0]), "42");
    assert!(matches!(out.verdict, Verdict::Changed(ref c) if c.value == Value::Int(42)));
}

#[test]
fn publish_sends_strings_numbers_bools_and_maps_with_options() {
    let r = rules(&[(
        "p.rhai",
        r#"
        fn on_start() {
            publish("a", "text");
            publish("b", 2.5);
            publish("c", true);
            publish("d", #{value: 1, ok: true}, #{qos: 1, retain: true});
            publish("e", 7, #{qos: 2});
        }
        "#,
    )]);
    let mut r = r;
    let out = r.start();
    assert!(out.failures.is_empty(), "{:?}", out.failures);
    let got: Vec<_> = out
        .publishes
        .iter()
        .map(|m| (m.topic.as_str(), text(m), m.qos, m.retain))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", "text", Qos::AtMostOnce, false),
            ("b", "2.5", Qos::AtMostOnce, false),
            ("c", "true", Qos::AtMostOnce, false),
            ("d", r#"{"ok":true,"value":1}"#, Qos::AtLeastOnce, true),
            ("e", "7", Qos::ExactlyOnce, false),
        ]
    );
}

#[test]
fn bad_publish_calls_fail_with_the_line() {
    for (src, needle) in [
        (r#"publish("a/#", 1)"#, "must not contain"),
        (r#"publish("a", 1, #{qos: 5})"#, "`qos` must be 0, 1 or 2"),
        (
            r#"publish("a", 1, #{retian: true})"#,
            "unknown publish option `retian`",
        ),
        (r#"publish("a", ())"#, "payload is ()"),
    ] {
        let mut r = rules(&[("bad.rhai", &format!("fn on_start() {{\n  {src};\n}}"))]);
        let out = r.start();
        assert_eq!(out.failures.len(), 1, "{src}");
        let f = &out.failures[0];
        assert!(f.message.contains(needle), "{src}: {}", f.message);
        assert_eq!((f.line, &*f.file), (2, "bad.rhai"), "{src}");
        assert!(f.to_string().starts_with("bad.rhai:2:"), "{f}");
        assert!(out.publishes.is_empty());
    }
}

#[test]
fn publishes_of_a_failed_call_are_discarded() {
    let mut r = rules(&[(
        "f.rhai",
        r#"fn on_start() { publish("a", 1); let x = #{}; x.missing.deeper; }"#,
    )]);
    let out = r.start();
    assert_eq!(out.failures.len(), 1);
    assert!(out.publishes.is_empty());
}

struct Recorder(Mutex<Vec<(String, String, Value)>>, CommandResult);

impl DeviceWriter for Recorder {
    fn write(&self, device: &str, point: &str, value: &Value) -> CommandResult {
        self.0
            .lock()
            .unwrap()
            .push((device.into(), point.into(), value.clone()));
        self.1.clone()
    }
}

#[test]
fn write_reaches_the_writer_and_returns_its_answer() {
    let src = r#"
        const SUBSCRIBE = ["cmd/+"];
        fn on_message(topic, payload) {
            let r = write("plc", "led", payload == "on");
            publish(topic + "/result", if r.ok { "ok" } else { "error: " + r.error });
        }
    "#;
    let r = rules(&[("led.rhai", src)]);
    let rec = Arc::new(Recorder(Mutex::new(Vec::new()), Ok(())));
    r.set_writer(rec.clone());
    let out = r.on_message("cmd/led", b"on");
    assert_eq!(
        rec.0.lock().unwrap().as_slice(),
        &[("plc".to_string(), "led".to_string(), Value::Bool(true))]
    );
    assert_eq!(out.writes.len(), 1);
    assert_eq!(out.writes[0].value, Value::Bool(true));
    assert_eq!(out.publishes[0].topic, "cmd/led/result");
    assert_eq!(text(&out.publishes[0]), "ok");

    r.set_writer(Arc::new(Recorder(
        Mutex::new(Vec::new()),
        Err("timeout".into()),
    )));
    let out = r.on_message("cmd/led", b"off");
    assert_eq!(text(&out.publishes[0]), "error: timeout");
    assert_eq!(out.writes[0].result, Err("timeout".to_string()));
}

#[test]
fn on_message_only_gets_subscribed_topics_and_blobs_for_binary() {
    let r = rules(&[(
        "m.rhai",
        r#"
        const SUBSCRIBE = ["cmd/#", "raw"];
        fn on_message(topic, payload) { publish("got", type_of(payload)); }
        "#,
    )]);
    assert_eq!(
        r.subscriptions(),
        vec!["cmd/#".to_string(), "raw".to_string()]
    );
    assert_eq!(text(&r.on_message("cmd/a/b", b"x").publishes[0]), "string");
    assert_eq!(text(&r.on_message("raw", &[0xff, 0]).publishes[0]), "blob");
    assert!(r.on_message("other", b"x").publishes.is_empty());
}

#[test]
fn on_line_turns_a_map_into_readings() {
    let r = rules(&[(
        "l.rhai",
        r#"
        fn on_line(device, line) {
            let parts = line.split(",");
            if parts.len() != 2 { return; }
            #{ temp: parse_float(parts[0]), level: #{ value: parse_int(parts[1]), unit: "%" } }
        }
        "#,
    )]);
    let out = r.on_line("tank", "21.5,80", 5);
    assert!(
        out.outcome.failures.is_empty(),
        "{:?}",
        out.outcome.failures
    );
    let mut got: Vec<_> = out
        .readings
        .iter()
        .map(|r| (r.point.to_string(), r.value.clone(), r.unit.clone(), r.ts))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("level".into(), Value::Int(80), Some(Arc::from("%")), 5),
            ("temp".into(), Value::Float(21.5), None, 5),
        ]
    );
    assert!(r.on_line("tank", "garbage", 5).readings.is_empty());
}

#[test]
fn helpers_now_ms_json_and_log() {
    let mut r = rules(&[(
        "h.rhai",
        r#"
        fn on_start() {
            log("info line");
            log("warn", "warn line");
            let j = parse_json(`{"a": [1, 2.5, "x"], "b": null}`);
            publish("json", to_json(j));
            publish("now", now_ms());
            publish("a1", j.a[1]);
        }
        "#,
    )]);
    r.set_clock(Some(123));
    let out = r.start();
    assert!(out.failures.is_empty(), "{:?}", out.failures);
    let got: Vec<_> = out.publishes.iter().map(text).collect();
    assert_eq!(got, vec![r#"{"a":[1,2.5,"x"],"b":null}"#, "123", "2.5"]);
}

#[test]
fn parse_json_errors_can_be_caught() {
    let mut r = rules(&[(
        "j.rhai",
        r#"fn on_start() { let v = "good"; try { parse_json("{nope"); } catch (e) { v = "bad"; } publish("x", v); }"#,
    )]);
    let out = r.start();
    assert_eq!(text(&out.publishes[0]), "bad");
}

#[test]
fn state_persists_between_calls_and_is_per_file() {
    let count = r#"fn on_reading(r) { state.n = (state.n ?? 0) + 1; publish("n", state.n); }"#;
    let r = rules(&[("a.rhai", count), ("b.rhai", count)]);
    r.on_reading(&reading("x", Value::Int(1)));
    let out = r.on_reading(&reading("x", Value::Int(1)));
    let got: Vec<_> = out.outcome.publishes.iter().map(text).collect();
    assert_eq!(got, vec!["2", "2"]);
}

#[test]
fn literal_constants_are_visible_in_functions() {
    let mut r = rules(&[(
        "c.rhai",
        r#"
        const LIMIT = 10;
        const NAMES = ["a", "b"];
        fn on_start() { publish("x", LIMIT * 2); publish("y", NAMES[1]); let LIMIT = 1; publish("z", LIMIT); }
        "#,
    )]);
    let out = r.start();
    assert!(out.failures.is_empty(), "{:?}", out.failures);
    let got: Vec<_> = out.publishes.iter().map(text).collect();
    assert_eq!(got, vec!["20", "b", "1"]);
}

#[test]
fn runtime_errors_are_counted_per_file_and_the_reading_passes() {
    let r = rules(&[
        ("bad.rhai", "fn on_reading(r) {\n  r.value + \"x\" * 2\n}"),
        ("good.rhai", r#"fn on_reading(r) { publish("ok", 1); }"#),
    ]);
    let out = r.on_reading(&reading("x", Value::Int(1)));
    assert_eq!(out.verdict, Verdict::Unchanged);
    assert_eq!(out.outcome.publishes.len(), 1);
    assert_eq!(out.outcome.failures.len(), 1);
    let f = &out.outcome.failures[0];
    assert_eq!(
        (&*f.file, f.function, f.line),
        ("bad.rhai", "on_reading", 2)
    );
    let stats = r.stats();
    assert_eq!((stats[0].errors, stats[0].calls), (1, 1));
    assert_eq!(stats[1].errors, 0);
}

#[test]
fn errors_in_helper_functions_name_the_helper_and_its_line() {
    let mut r = rules(&[(
        "h.rhai",
        "fn helper(x) {\n  x.nope()\n}\nfn on_start() { helper(1); }",
    )]);
    let f = &r.start().failures[0];
    assert_eq!(f.line, 2, "{f}");
    assert!(f.message.contains("(in fn helper)"), "{f}");
}

#[test]
fn a_bad_return_value_is_an_error_and_the_reading_passes() {
    let r = rules(&[("r.rhai", "fn on_reading(r) { 42 }")]);
    let out = r.on_reading(&reading("x", Value::Int(1)));
    assert_eq!(out.verdict, Verdict::Unchanged);
    assert!(out.outcome.failures[0].message.contains("returned i64"));
}

fn one_failure(src: &str) -> Failure {
    let mut r = rules(&[("s.rhai", src)]);
    let out = r.start();
    assert_eq!(out.failures.len(), 1, "{src}: {:?}", out.failures);
    out.failures[0].clone()
}

#[test]
fn an_endless_loop_is_stopped_by_the_deadline() {
    // A short deadline, so that the loop reaches it before the operation
    // limit (the suite's generous DEADLINE would let the limit win).
    let mut r = Rules::from_sources(
        sources(&[("s.rhai", "fn on_start() {\n  loop { }\n}")]),
        Duration::from_millis(20),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = r.start();
    assert_eq!(out.failures.len(), 1, "{:?}", out.failures);
    let f = out.failures[0].clone();
    assert_eq!(f.kind, FailureKind::Deadline, "{f}");
    assert!(f.message.contains("deadline"), "{f}");
    assert_eq!((f.line, f.column), (1, 1), "points at the handler: {f}");
}

#[test]
fn the_deadline_is_per_call() {
    // Two calls that each take well under the deadline do not add up.
    let r = rules(&[(
        "t.rhai",
        "fn on_reading(r) { let n = 0; while n < 2000 { n += 1; } }",
    )]);
    for _ in 0..20 {
        assert!(r
            .on_reading(&reading("x", Value::Int(1)))
            .outcome
            .failures
            .is_empty());
    }
}

#[test]
fn deep_recursion_is_stopped() {
    let f = one_failure("fn f(n) { f(n + 1) }\nfn on_start() { f(0) }");
    assert!(f.message.contains("Stack overflow"), "{f}");
}

#[test]
fn huge_strings_arrays_and_maps_are_stopped() {
    let f = one_failure(r#"fn on_start() { let s = "x"; loop { s += s; } }"#);
    assert!(f.message.contains("Length of string"), "{f}");
    let f = one_failure("fn on_start() { let a = []; loop { a.push(1); } }");
    assert!(f.message.contains("Size of array"), "{f}");
}

#[test]
fn an_unbounded_state_is_cleared() {
    let r = rules(&[(
        "s.rhai",
        "fn on_reading(r) {\n  for i in 0..100 { state[`k${r.ts}_${i}`] = r.value; }\n  publish(\"n\", state.len());\n}",
    )]);
    let mut last = 0;
    for ts in 0..1000 {
        let mut rd = reading("x", Value::Int(1));
        rd.ts = ts;
        let out = r.on_reading(&rd);
        if let Some(f) = out.outcome.failures.first() {
            assert!(f.message.contains("`state` grew past"), "{f}");
            assert_eq!(f.line, 1);
            last = ts;
            break;
        }
    }
    assert_eq!(last, MAX_STATE_ITEMS as i64 / 100);
    let out = r.on_reading(&reading("x", Value::Int(1)));
    assert_eq!(text(&out.outcome.publishes[0]), "100", "state starts over");
}

#[test]
fn a_publish_flood_is_stopped() {
    let f = one_failure(r#"fn on_start() { loop { publish("x", 1); } }"#);
    assert!(f.message.contains("messages in one call"), "{f}");
}

#[test]
fn a_write_flood_is_stopped_and_earlier_writes_stay_recorded() {
    let mut r = rules(&[(
        "w.rhai",
        r#"fn on_start() { loop { write("d", "p", 1); } }"#,
    )]);
    let out = r.start();
    assert!(
        out.failures[0].message.contains("writes in one call"),
        "{:?}",
        out.failures
    );
    assert_eq!(out.writes.len(), MAX_WRITES_PER_CALL);
}

#[test]
fn eval_and_import_are_rejected_when_compiling() {
    let e = try_rules(&[("e.rhai", "fn on_start() {\n  eval(\"1\")\n}")]).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("rules/e.rhai:2:3: "), "{text}");
    assert!(text.contains("eval"), "{text}");
    let e = try_rules(&[("i.rhai", "import \"x\" as x;\nfn on_start() {}")]).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("rules/i.rhai:1:1: "), "{text}");
    assert!(text.contains("import"), "{text}");
}

#[test]
fn print_and_debug_do_not_fail() {
    let mut r = rules(&[("p.rhai", r#"fn on_start() { print("hello"); debug(42); }"#)]);
    assert!(r.start().failures.is_empty());
}

#[test]
fn compile_errors_of_every_file_are_reported_with_line_and_column() {
    let e = try_rules(&[
        ("a.rhai", "fn on_reading(r) {\n  let x = ;\n}"),
        ("b.rhai", "fn ok() { 1 }"),
        ("c.rhai", "fn on_reading(a, b) { }"),
        ("d.rhai", "fn on_message(t, p) { }"),
        (
            "e.rhai",
            "const SUBSCRIBE = [\"a/#/b\"];\nfn on_message(t, p) { }",
        ),
        ("f.rhai", "const SUBSCRIBE = [\"a\"];"),
    ])
    .unwrap_err();
    let lines: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(lines[0].starts_with("rules/a.rhai:2:11: "), "{}", lines[0]);
    assert!(
        lines[1].starts_with("rules/c.rhai:1:1: `on_reading` takes 1 parameter"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("rules/d.rhai:1:1: `on_message` needs"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("rules/e.rhai:1:7: `SUBSCRIBE`"),
        "{}",
        lines[3]
    );
    assert!(lines[4].contains("no `fn on_message"), "{}", lines[4]);
}

#[test]
fn reload_keeps_state_of_unchanged_files_and_restarts_changed_ones() {
    let counter = r#"
        fn on_start() { state.n = 100; }
        fn on_reading(r) { state.n += 1; publish("n", state.n); }
    "#;
    let mut r = rules(&[("a.rhai", counter), ("b.rhai", counter)]);
    r.start();
    r.on_reading(&reading("x", Value::Int(1)));
    let changed = format!("{counter}\n// changed");
    let reloaded = r
        .replace(sources(&[("a.rhai", counter), ("b.rhai", &changed)]))
        .unwrap();
    assert_eq!(reloaded.kept, vec![Arc::from("a.rhai")]);
    assert_eq!(reloaded.started, vec![Arc::from("b.rhai")]);
    let out = r.on_reading(&reading("x", Value::Int(1)));
    let got: Vec<_> = out.outcome.publishes.iter().map(text).collect();
    assert_eq!(got, vec!["102", "101"]);
    assert_eq!(r.stats()[0].calls, 3, "counters of unchanged files survive");
}

#[test]
fn a_broken_reload_changes_nothing() {
    let mut r = rules(&[("a.rhai", r#"fn on_reading(r) { publish("v", 1); }"#)]);
    let err = r
        .replace(sources(&[
            ("a.rhai", r#"fn on_reading(r) { publish("v", 2); }"#),
            ("b.rhai", "fn on_reading(r) { ) }"),
        ]))
        .unwrap_err();
    assert!(err.to_string().starts_with("rules/b.rhai:1:"), "{err}");
    let out = r.on_reading(&reading("x", Value::Int(1)));
    assert_eq!(text(&out.outcome.publishes[0]), "1");
    assert_eq!(r.files().len(), 1);
}

#[test]
fn load_dir_reads_rhai_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.rhai"),
        r#"fn on_start() { publish("b", 1); }"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.rhai"),
        r#"fn on_start() { publish("a", 1); }"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a rule").unwrap();
    let mut r = Rules::load_dir(dir.path(), DEADLINE).unwrap();
    let topics: Vec<_> = r.start().publishes.into_iter().map(|m| m.topic).collect();
    assert_eq!(topics, vec!["a", "b"]);

    std::fs::write(
        dir.path().join("c.rhai"),
        r#"fn on_start() { publish("c", 1); }"#,
    )
    .unwrap();
    let reloaded = r.reload().unwrap();
    assert_eq!(reloaded.started, vec![Arc::from("c.rhai")]);
    assert_eq!(reloaded.outcome.publishes[0].topic, "c");

    let missing = Rules::load_dir(&dir.path().join("nope"), DEADLINE).unwrap_err();
    assert!(
        missing.to_string().contains("cannot read rules"),
        "{missing}"
    );
}

/// Every ```rhai example in rules/README.md compiles.
#[test]
fn readme_examples_compile() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/README.md")).unwrap();
    let mut n = 0;
    for block in readme.split("```rhai\n").skip(1) {
        let code = block.split("```").next().unwrap();
        n += 1;
        if let Err(e) = try_rules(&[("example.rhai", code)]) {
            panic!("README example {n} does not compile:\n{e}\n{code}");
        }
    }
    assert!(n >= 6, "found {n} examples");
}

#[test]
fn readme_moving_average_and_line_examples_work() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/README.md")).unwrap();
    let example = |needle: &str| {
        readme
            .split("```rhai\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .find(|b| b.contains(needle))
            .unwrap()
            .to_string()
    };
    let r = rules(&[("avg.rhai", &example("moving average"))]);
    let mut last = String::new();
    for v in [1.0, 2.0, 3.0] {
        let out = r.on_reading(&reading("x", Value::Float(v)));
        assert!(
            out.outcome.failures.is_empty(),
            "{:?}",
            out.outcome.failures
        );
        last = text(&out.outcome.publishes[0]).to_string();
    }
    assert_eq!(last, "2");
    let r = rules(&[("line.rhai", &example("T=21.5;H=40"))]);
    let out = r.on_line("env", "T=21.5;H=40", 0);
    assert!(
        out.outcome.failures.is_empty(),
        "{:?}",
        out.outcome.failures
    );
    assert_eq!(out.readings.len(), 2);
    let r = rules(&[("f.rhai", &example("°F"))]);
    let mut rd = reading("t", Value::Float(100.0));
    rd.unit = Some(Arc::from("°C"));
    rd.device = Arc::from("boiler");
    let out = r.on_reading(&rd);
    assert!(
        out.outcome.failures.is_empty(),
        "{:?}",
        out.outcome.failures
    );
    assert_eq!(text(&out.outcome.publishes[0]), "212");
}

#[test]
fn state_and_constants_are_visible_in_helper_functions_and_closures() {
    let mut r = rules(&[(
        "h.rhai",
        r#"
        const STEP = 5;
        fn bump() { state.n = (state.n ?? 0) + STEP; state.n }
        fn on_start() {
            bump();
            let f = |x| x + STEP;
            publish("n", bump());
            publish("f", f.call(1));
        }
        "#,
    )]);
    let out = r.start();
    assert!(out.failures.is_empty(), "{:?}", out.failures);
    let got: Vec<_> = out.publishes.iter().map(text).collect();
    assert_eq!(got, vec!["10", "6"]);
}

/// Runs `f` on a thread with the rules' stack, as the gateway does.
fn on_rules_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(RULES_STACK_SIZE)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn deep_nesting_is_bounded_and_does_not_overflow() {
    on_rules_stack(|| {
        for src in [
            "fn on_start() { let a = []; loop { a = [a]; } }",
            "fn on_start() { let m = #{}; loop { m = #{ x: m }; } }",
            "fn on_start() { let a = []; loop { a = [#{ x: a }]; } }",
            "fn on_start() { loop { state.x = #{ x: state.x }; } }",
        ] {
            // Stopped by the size limits (rhai counts nested items), the
            // state check or, on a slow machine, the deadline; either way
            // nothing overflows.
            let mut r = rules(&[("s.rhai", src)]);
            let failures = r.start().failures;
            assert!(!failures.is_empty(), "{src}");
            for f in failures {
                assert!(
                    f.message.contains("too large")
                        || f.message.contains("64 levels")
                        || f.kind == FailureKind::Deadline,
                    "{src}: {f}"
                );
            }
        }
    });
}

#[test]
fn deep_values_are_refused_by_to_json_and_state() {
    on_rules_stack(|| {
        let f =
            one_failure("fn on_start() { let a = []; for i in 0..200 { a = [a]; } to_json(a) }");
        assert!(f.message.contains("nested deeper than 128"), "{f}");
        let f = one_failure("fn on_start() { for i in 0..100 { state.x = #{ x: state.x }; } }");
        assert!(f.message.contains("64 levels"), "{f}");
    });
}

#[test]
fn state_must_stay_a_map() {
    let mut r = rules(&[(
        "s.rhai",
        "fn on_start() { state = 5; }\nfn on_reading(r) { state.n = (state.n ?? 0) + 1; publish(\"n\", state.n); }",
    )]);
    let out = r.start();
    assert!(
        out.failures[0].message.contains("must stay a map"),
        "{:?}",
        out.failures
    );
    let out = r.on_reading(&reading("x", Value::Int(1)));
    assert!(
        out.outcome.failures.is_empty(),
        "{:?}",
        out.outcome.failures
    );
    assert_eq!(text(&out.outcome.publishes[0]), "1");
}

#[test]
fn constant_expressions_are_folded_and_visible() {
    let mut r = rules(&[(
        "c.rhai",
        "const A = 60 * 1000;\nconst B = A * 2;\nconst C = #{x: 1, y: [1, 2]};\nfn on_start() { publish(\"a\", A); publish(\"b\", B); publish(\"c\", C); }",
    )]);
    let out = r.start();
    assert!(out.failures.is_empty(), "{:?}", out.failures);
    let got: Vec<_> = out.publishes.iter().map(text).collect();
    assert_eq!(got, vec!["60000", "120000", r#"{"x":1,"y":[1,2]}"#]);
}
