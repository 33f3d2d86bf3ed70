pub mod loader;
#[cfg(test)]
mod tagged_enums;
