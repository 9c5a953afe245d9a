//! What the pageserver shares with its clients: the page service protocol spoken by computes
//! (`pagestream`) and the bodies of its HTTP management API (`models`).

pub mod models;
pub mod pagestream;
