pub mod acpi;
pub mod emulate;
