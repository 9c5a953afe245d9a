//! See DESIGN.md §2. Filled in by the issue that needs it.
