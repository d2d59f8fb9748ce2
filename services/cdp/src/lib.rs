//! What the `cdp` binary wires between services that never import each other, kept in a
//! library so that the end-to-end tests run the same code as the command.

pub mod verify;
