//! The generation loop shared by the CLI and the server.
