//! SSH public keys for tests: real `ssh-keygen -t ed25519` output of throwaway keys whose
//! private halves were deleted, so they pass every check the schema and the agent make.

pub const ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBi8RSAcFJ8HbhMjqJDMlxhZszF0DV0wk0J0gACoKlk2 alice@example";
pub const BOB: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPk8uSA9QL6KtdRXakqZIZEcN16EFRAyswYjWNU2Eni3 bob@example";
pub const CAROL: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPF6FJBsa3CYLnHaMGMZ+gpGedo13Jotai01FTA9Zh5t carol@example";
pub const MALLORY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAjCyyHFo7fK3Ken/ui5La8EPoNpVmjGLjOLzNRiuH06 mallory@example";
