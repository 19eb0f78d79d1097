pub mod emulate;
