//! Message structure for FETCH and SEARCH: ENVELOPE, BODYSTRUCTURE,
//! body sections and decoded text (RFC 9051 6.4.4, 6.4.5, 7.5.2).
