//! Placeholder: the dispatcher (issue 5).
