"""skippipe package."""
