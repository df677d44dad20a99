//! progdiff cache
