"""Source patches for fixes: edit the user's file with libcst, show a unified diff."""
