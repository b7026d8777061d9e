"""Pictures people would rather look at than read: HTML attribution pages and plots."""
