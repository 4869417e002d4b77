//! The task body of `PUT /v1/tasks/{id}`: `serde_json::from_slice::<TaskSpec>`
//! then `validate()`, and the task id check. Never panics; a valid task
//! serializes to JSON that reads back as the same, still valid, task.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_state::{validate_task_id, TaskSpec};

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = std::str::from_utf8(data) {
        let _ = validate_task_id(id);
    }
    let Ok(spec) = serde_json::from_slice::<TaskSpec>(data) else {
        return;
    };
    let valid = spec.validate().is_ok();
    let json = serde_json::to_vec(&spec).expect("a task serializes");
    let again: TaskSpec = serde_json::from_slice(&json).expect("a serialized task reads back");
    assert_eq!(again, spec);
    assert_eq!(again.validate().is_ok(), valid);
});
