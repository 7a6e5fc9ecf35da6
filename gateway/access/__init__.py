"""Who may see what: authentication, the access policy, study links, emergency access, audit."""
