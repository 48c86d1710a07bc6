//! NBD client side (filled in next).
