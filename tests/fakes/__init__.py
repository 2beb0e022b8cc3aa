"""Local stand-ins for Apple's and Google's push services, used by tests and benchmarks.

They speak the real protocols (HTTP/2 over TLS for APNs, the FCM v1 REST API and Google's
OAuth token endpoint), so the production clients run unmodified against them."""
