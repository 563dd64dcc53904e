"""Generated align2.v1 stubs (see protos/). Do not edit."""
