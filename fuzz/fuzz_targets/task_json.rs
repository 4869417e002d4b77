//! Task bodies: as a client sends them (`parse_task_body`, strict: unknown
//! fields refused) and as a peer gossips them (`serde_json::from_slice`,
//! tolerant), then `validate()`, and the task id check. Never panics; what
//! the strict reader accepts the tolerant one reads the same; a task
//! serializes to JSON that reads back as the same, still valid, task, and
//! strictly (it has no field a reader does not know).
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_state::{parse_task_body, validate_task_id, TaskSpec};

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = std::str::from_utf8(data) {
        let _ = validate_task_id(id);
    }
    let strict = parse_task_body(data);
    let Ok(spec) = serde_json::from_slice::<TaskSpec>(data) else {
        assert!(strict.is_err(), "the strict reader accepted what the tolerant one refused");
        return;
    };
    if let Ok(strict) = strict {
        assert_eq!(strict, spec);
    }
    let valid = spec.validate().is_ok();
    let json = serde_json::to_vec(&spec).expect("a task serializes");
    let again: TaskSpec = serde_json::from_slice(&json).expect("a serialized task reads back");
    assert_eq!(again, spec);
    assert_eq!(parse_task_body(&json).as_ref(), Ok(&spec), "our own JSON is strict");
    assert_eq!(again.validate().is_ok(), valid);
});
