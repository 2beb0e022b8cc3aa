"""otp domain."""
